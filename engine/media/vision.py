"""Vision-language models through mlx-vlm: the conversation with its images -> one or more
generation passes ("chunks"), each streamed as it is produced.

Images are numbered across the whole conversation ("Image 1", "Image 2" …, a picture sent again
keeps its number). When the conversation holds no more images than one pass may take, every
image stays where it was sent. Otherwise the newest user turn's images are processed in chunks
of `chunk_size`: each pass sees the conversation (earlier images as a marker) and its own
images, so memory stays bounded; the passes' answers are joined with a blank line and their
token counts summed. `max_tokens` is the whole answer's budget, shared evenly by the passes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence


from engine.generation.batching import Step
from engine.generation.budget import BudgetPolicy, max_new_tokens
from engine.errors import InvalidRequest
from engine.config import ImageLimits
from engine.media.images import check, decode, numbering
from engine.models.memory import MemoryEstimate, MemoryGate
from engine.models.probe import Probe
from engine.generation.prompt_cache import PromptCache
from engine.generation.templates import render_chat
from engine.generation.tokens import TokenizerFailed, is_panic, prompt_chars
from engine.generation.text import (ChatMessage, Finished, GenerationEvent, SamplingParams, Started, TextDelta,
                         TextRunner, decode_steps)
from engine.generation.turns import render_turn, with_tool_prompt
from engine.models.weights import KV_HEADROOM_TOKENS, kv_bytes_per_token
from engine.constrained.toolcalls import hermes
from engine.constrained.tools import ToolChoice, ToolSpec

if TYPE_CHECKING:
    from engine.request import Conversation, Pass, Prepared

log = logging.getLogger("openmlx.engine")
SEPARATOR = "\n\n"  # between the answers of two chunks


@dataclass
class VisionPass:
    """One generation pass: the processed inputs mlx-vlm generates from."""

    inputs: dict[str, Any]
    prompt_tokens: int
    images: tuple[int, ...]  # the image numbers it sees


@dataclass
class VisionPlan:
    passes: list[VisionPass]

    @property
    def prompt_tokens(self) -> int:
        return max(p.prompt_tokens for p in self.passes)


def template_turns(messages: Sequence[ChatMessage], numbers: dict[str, int],
                   shown: set[str]) -> tuple[list[dict], list[str]]:
    """Template turns, and the images they show in placeholder order: a picture in `shown`
    is a labelled image part where it first appears ("Image N (again)" later), every other
    picture a marker."""
    turns, order = [], []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if not m.images:  # tool calls and results as text, in the generic prompt's format
            turns.append(render_turn(m, hermes.FORMAT, native=False))
            continue
        parts: list[dict] = []
        hidden: list[str] = []
        for image in m.images:
            label = f"Image {numbers[image.digest]}"
            if image.digest not in shown:
                hidden.append(label)
            elif image.digest in order:
                parts.append({"type": "text", "text": f"{label} (again)."})
            else:
                order.append(image.digest)
                parts += [{"type": "text", "text": f"{label}:"}, {"type": "image"}]
        if hidden:  # numbered, so the answer can still refer to them
            marker = f"[{', '.join(hidden)} {'was' if len(hidden) == 1 else 'were'} attached]"
            text = m.content + ("\n" if m.content else "") + marker
        else:
            text = m.content
        parts.append({"type": "text", "text": text})
        turns.append({"role": role, "content": parts})
    return turns, order


@dataclass
class VisionRunner(TextRunner):
    """A loaded mlx-vlm model. Shares sampling, stop strings and accounting with TextRunner."""

    processor: Any = None
    limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def load(cls, model_id: str, probe: Probe, cpu_dtype: str, gate: MemoryGate,
             limits: Optional[ImageLimits] = None) -> "VisionRunner":  # type: ignore[override]
        """Gate memory, then load with mlx-vlm (weights as shipped)."""
        from mlx_vlm import load as vlm_load

        config = probe.config
        text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        kv_bytes = kv_bytes_per_token({**config, **text_cfg})
        need = MemoryEstimate(probe.size_bytes, KV_HEADROOM_TOKENS * kv_bytes)
        warnings = tuple(gate.check(model_id, need))
        model, processor = vlm_load(str(probe.path))
        log.info("loaded %s (%s, vision, mlx-vlm)", model_id, probe.architecture)
        context = probe.context_length or 4096
        tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
        return cls(model_id, model, tokenizer, config, probe, "keep", context, need, warnings,
                   prompt_cache=PromptCache(max_entries=0), processor=processor, limits=limits or ImageLimits())

    def check_params(self, params: SamplingParams) -> None:
        """Grammar-constrained decoding (JSON modes) needs mlx-lm's tokenizer: not for vision."""
        if params.grammar:
            raise InvalidRequest("response_format json_object/json_schema is not supported for vision models.",
                                 param="response_format")
        super().check_params(params)

    @property
    def vocab_size(self) -> int:
        cfg = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else self.config
        return int(cfg.get("vocab_size") or self.config.get("vocab_size") or len(self.tokenizer))

    # --- prompts -------------------------------------------------------------------------
    def _pass(self, turns: list[dict], images: list[Any], numbers: tuple[int, ...], continue_final: bool) -> VisionPass:
        from mlx_vlm.utils import prepare_inputs

        prompt = render_chat(lambda: self.processor.apply_chat_template(
            turns, **({"continue_final_message": True} if continue_final else {"add_generation_prompt": True})),
            prompt_chars(self.tokenizer, self.context_length))
        # mlx-vlm does not check placeholders against images (one placeholder and two images
        # silently drops one): count them ourselves.
        placeholders = prompt.count("<|image_pad|>") if "<|image_pad|>" in self.tokenizer.get_vocab() else len(images)
        if placeholders != len(images):
            raise InvalidRequest(f"The model's chat template placed {placeholders} image(s) for {len(images)} "
                                 "image(s) sent.", param="messages")
        try:
            inputs = prepare_inputs(self.processor, images=images or None, prompts=prompt,
                                    image_token_index=getattr(self.model.config, "image_token_index", None))
        except Exception as e:  # the processor's own complaint about an image it can't take
            raise InvalidRequest(f"The model's processor could not take the images: {e}", param="messages") from e
        except BaseException as e:  # tokenizers' Rust panic is not an Exception
            if not is_panic(e):
                raise
            raise TokenizerFailed(f"The model's tokenizer failed on the prompt (a panic in tokenizers: "
                                  f"{str(e)[:200]}).") from None
        return VisionPass(dict(inputs), int(inputs["input_ids"].shape[-1]), numbers)

    def passes(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = (), continue_final: bool = False,
               chunk_size: Optional[int] = None) -> VisionPlan:
        """The passes for a conversation (see the module docstring)."""
        if tools:
            messages = with_tool_prompt(messages, tools)
        every = [image for m in messages for image in m.images]
        if len(every) > self.limits.max_images:
            raise InvalidRequest(f"The conversation has {len(every)} images; this server takes at most "
                                 f"{self.limits.max_images} per request.", param="messages", code="too_many_images")
        size = chunk_size or self.limits.chunk_size
        if not 1 <= size <= self.limits.max_chunk_size:
            raise InvalidRequest(f"image_chunk_size must be between 1 and {self.limits.max_chunk_size}.",
                                 param="image_chunk_size")
        for image in every:  # every header first: a bad or oversized image fails before any decoding
            check(image, self.limits)
        by_digest = {image.digest: image for image in every}

        def decoded(order: list[str]) -> list[Any]:
            # Only one pass's images are decoded at a time (at most max_chunk_size of them).
            return [decode(by_digest[d], self.limits) for d in order]

        numbers = numbering(every)
        if len(numbers) <= size:
            turns, order = template_turns(messages, numbers, set(numbers))
            return VisionPlan([self._pass(turns, decoded(order), tuple(numbers[d] for d in order),
                                          continue_final)])
        newest = max(i for i, m in enumerate(messages) if m.role == "user")
        own = list(dict.fromkeys(image.digest for image in messages[newest].images))
        passes = []
        for start in range(0, len(own), size):
            group = own[start:start + size]
            turns, order = template_turns(messages, numbers, set(group))
            first, last = numbers[group[0]], numbers[group[-1]]
            span = f"Images {first}-{last}" if first != last else f"Image {first}"
            turns[newest]["content"][-1]["text"] += f"\n({span} of {len(numbers)}.)"
            passes.append(self._pass(turns, decoded(order), tuple(numbers[d] for d in order), continue_final))
        return VisionPlan(passes)

    # --- the runner interface (engine/runners.py) ------------------------------------------
    def plan(self, conv: "Conversation", policy: BudgetPolicy) -> "Prepared":
        """A chat request with its images: the passes (images decoded and checked here, on the
        worker) and the budget."""
        from engine.request import Prepared

        choice = conv.tool_choice or ToolChoice()
        if conv.tools and choice.mode != "auto":
            raise InvalidRequest("tool_choice required or a named function needs constrained decoding, which "
                                 "vision models don't support here; use tool_choice auto.", param="tool_choice")
        self.check_params(conv.params)
        plan = self.passes(conv.messages, conv.tools, conv.continue_final, conv.image_chunk_size)
        budget = max_new_tokens(plan.prompt_tokens, conv.params.max_tokens, self.context_length, policy, conv.fields)
        return Prepared(self.model_id, [], budget, conv.params, self, vision=plan)

    def plan_completion(self, prompt: Any, params: SamplingParams, policy: BudgetPolicy,
                        echo: bool = False) -> "Prepared":
        raise InvalidRequest(f"The model '{self.model_id}' is a vision model: use /v1/chat/completions.",
                             param="model")

    def count_tokens(self, conv: "Conversation") -> int:
        return self.passes(conv.messages, conv.tools, conv.continue_final, conv.image_chunk_size).prompt_tokens

    def share_prefill(self, prepared: "Prepared", score_top: Optional[int] = None) -> Iterator[Pass]:
        """Each pass prefills its own images: nothing is shared, and prompts aren't scored."""
        if score_top is not None:
            raise InvalidRequest("Prompt log probabilities (echo with logprobs) are not supported for vision "
                                 "models.", param="echo")
        return prepared
        yield  # a generator, as every runner's share_prefill (engine/runners.py)

    def run(self, prepared: "Prepared", cancelled: Callable[[], bool]) -> Iterator[GenerationEvent]:
        yield from self.generate_plan(prepared.vision, prepared.max_tokens, prepared.params, cancelled)

    # --- generation ----------------------------------------------------------------------
    def generate_plan(self, plan: VisionPlan, max_tokens: int, params: SamplingParams,
                      cancelled: Callable[[], bool]) -> Iterator[GenerationEvent]:
        """Run the passes one after another as one answer: a Started, text deltas (a blank line
        between passes), one Finished with the passes' summed counts."""
        from mlx_vlm import stream_generate

        sampler, processors = self.sampling(params)
        share = max(1, max_tokens // len(plan.passes))
        prompt_total = sum(p.prompt_tokens for p in plan.passes)
        yield Started(prompt_total, 0)
        generated, finish, stop_sequence = 0, "stop", None
        for i, vision_pass in enumerate(plan.passes):
            if i:
                yield TextDelta(SEPARATOR)
            inputs = dict(vision_pass.inputs)
            kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
            steps = stream_generate(self.model, self.processor, "", input_ids=inputs["input_ids"],
                                    pixel_values=inputs.get("pixel_values"), mask=inputs.get("attention_mask"),
                                    max_tokens=share, sampler=sampler, logits_processors=processors or None,
                                    **kwargs)
            tokens: list[int] = []
            for event in decode_steps(self, _vlm_steps(steps), tokens, vision_pass.prompt_tokens, 0, share, params,
                                      cancelled):
                if isinstance(event, Finished):
                    generated += event.completion_tokens
                    stop_sequence = event.stop_sequence
                    if event.finish_reason in ("length", "cancelled") and finish != "cancelled":
                        finish = event.finish_reason
                elif not isinstance(event, Started):
                    yield event
            if finish == "cancelled" or stop_sequence:  # a stop string ends the whole answer
                break
        yield Finished(finish, prompt_total, generated, 0, stop_sequence)


def _vlm_steps(results: Iterator[Any]) -> Iterator[Step]:
    """mlx-vlm's results as decode_steps expects them. Its last result repeats the last token
    to flush the detokenizer's text: that one carries text only."""
    count = 0
    for r in results:
        fresh = r.generation_tokens > count
        count = r.generation_tokens
        yield Step(int(r.token) if fresh and r.token is not None else None, r.text,
                    r.logprobs if fresh else None, r.finish_reason)
