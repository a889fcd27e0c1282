"""llama.cpp's greedy tokens and first-position top log probabilities for prompts (run in a venv
with llama-cpp-python, by tests/test_real_models.py; prints JSON).

Usage: python llama_cpp_reference.py MODEL.gguf N_TOKENS '["prompt", ...]'
"""
import json
import math
import sys

from llama_cpp import Llama

path, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
out = []
for prompt in prompts:
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    greedy = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(greedy) >= n:
            break
        greedy.append(token)
    llm.reset()
    llm.eval(ids)
    logits = [float(x) for x in llm.scores[len(ids) - 1]]
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    best = sorted(range(len(logits)), key=lambda i: logits[i], reverse=True)[:5]
    out.append({"tokens": [llm.detokenize([t]).decode("utf-8", "replace") for t in greedy],
                "top": {llm.detokenize([i]).decode("utf-8", "replace"): logits[i] - norm for i in best}})
print(json.dumps(out))
