// Six calls through openapi-fetch, typed by openapi-typescript from the served spec
// (run by contract/test_generated_clients.py; compiled with `tsc --strict` first).
import createClient from "openapi-fetch";
import type { paths } from "./api.js";

const [baseUrl, model, embeddingModel] = process.argv.slice(2);
const api = createClient<paths>({ baseUrl });
const question = "What is the capital of France?";

function check(ok: unknown, what: string): void {
  if (!ok) throw new Error(`wrong answer: ${what}`);
}

async function main(): Promise<void> {
  const models = await api.GET("/v1/models");
  check(models.data?.data.some((m) => m.id === model), "models");
  console.log("models", models.data?.data.map((m) => m.id));

  const chat = await api.POST("/v1/chat/completions", {
    body: { model, messages: [{ role: "user", content: question }], max_tokens: 8 },
  });
  // The JSON answer and the stream are told apart by type: the stream is declared as text.
  const answer = chat.data;
  if (answer === undefined || typeof answer === "string") throw new Error("chat: no JSON answer");
  check(answer.choices[0].message.content, "chat content");
  console.log("chat", JSON.stringify(answer.choices[0].message.content), answer.choices[0].finish_reason);

  const streamed = await api.POST("/v1/chat/completions", {
    body: { model, messages: [{ role: "user", content: question }], max_tokens: 4, stream: true },
    parseAs: "text",
  });
  const events = streamed.data;
  if (typeof events !== "string") throw new Error("chat stream: not text");
  check(events.includes("data: [DONE]"), "chat stream");
  console.log("chat stream", events.trim().split("\n\n").length, "events");

  const completion = await api.POST("/v1/completions", {
    body: { model, prompt: "The capital of France is", max_tokens: 4 },
  });
  const text = completion.data;
  if (text === undefined || typeof text === "string") throw new Error("completion: no JSON answer");
  check(text.choices[0].text, "completion text");
  console.log("completion", JSON.stringify(text.choices[0].text));

  const embeddings = await api.POST("/v1/embeddings", { body: { model: embeddingModel, input: ["a cat", "a dog"] } });
  check(embeddings.data?.data.length === 2, "embeddings");
  console.log("embeddings", embeddings.data?.data.length);

  const response = await api.POST("/v1/responses", { body: { model, input: question, max_output_tokens: 8 } });
  const resp = response.data;
  if (resp === undefined || typeof resp === "string") throw new Error("responses: no JSON answer");
  check(resp.output.length > 0, "response output");
  console.log("response", resp.status, resp.output[0].type);

  const message = await api.POST("/v1/messages", {
    body: { model, max_tokens: 8, messages: [{ role: "user", content: question }] },
  });
  const msg = message.data;
  if (msg === undefined || typeof msg === "string") throw new Error("messages: no JSON answer");
  check(msg.content[0].text, "message text");
  console.log("message", JSON.stringify(msg.content[0].text), msg.stop_reason);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
