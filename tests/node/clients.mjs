// The JavaScript clients, unchanged, driven by tests/test_node_clients.py through the proxy.
// Usage: node clients.mjs CASE BASE_URL [API_KEY]; prints one JSON object on stdout.
import { Ollama } from "ollama";
import OpenAI from "openai";

const [caseName, host, apiKey] = process.argv.slice(2);
const MODEL = "llama3:70b";
const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : undefined;
const ollama = new Ollama({ host, headers });
const messages = [{ role: "user", content: "why is the sky blue?" }];

const cases = {
  async "ollama-chat-stream"() {
    const parts = [];
    for await (const part of await ollama.chat({ model: MODEL, messages, stream: true })) {
      parts.push(part);
    }
    const last = parts[parts.length - 1];
    return {
      text: parts.map((p) => p.message.content).join(""),
      done: last.done,
      eval_count: last.eval_count,
    };
  },
  async "ollama-generate"() {
    const whole = await ollama.generate({ model: MODEL, prompt: "hi", options: { num_predict: 2 } });
    return { text: whole.response, done_reason: whole.done_reason };
  },
  async "ollama-list"() {
    const listed = await ollama.list();
    const shown = await ollama.show({ model: MODEL });
    return { models: listed.models.map((m) => m.model), family: shown.details.family };
  },
  async "ollama-embed"() {
    const embed = await ollama.embed({ model: MODEL, input: ["a", "b"] });
    const legacy = await ollama.embeddings({ model: MODEL, prompt: "a" });
    return { count: embed.embeddings.length, legacy: legacy.embedding };
  },
  async "ollama-missing-model"() {
    try {
      await ollama.show({ model: "no-such-model" });
      return { error: null };
    } catch (e) {
      return { error: e.error ?? String(e), status: e.status_code };
    }
  },
  async "openai-chat-stream"() {
    const client = new OpenAI({ baseURL: `${host}/v1`, apiKey: apiKey ?? "ollama", maxRetries: 0 });
    const stream = await client.chat.completions.create({ model: MODEL, messages, stream: true });
    let text = "";
    let finish = null;
    for await (const chunk of stream) {
      const choice = chunk.choices[0];
      if (choice) {
        text += choice.delta.content ?? "";
        finish = choice.finish_reason ?? finish;
      }
    }
    const models = [];
    for await (const model of client.models.list()) models.push(model.id);
    // openai-js asks for base64 unless told; the float form is what every Ollama answers.
    const embedded = await client.embeddings.create({
      model: MODEL,
      input: "a",
      encoding_format: "float",
    });
    return { text, finish, models, dims: embedded.data[0].embedding.length };
  },
  async "openai-retry"() {
    // A short timeout and one retry: what openai-js does after Node's 300 s, sooner.
    const client = new OpenAI({
      baseURL: `${host}/v1`,
      apiKey: "ollama",
      timeout: Number(process.env.CLIENT_TIMEOUT_MS ?? 3000),
      maxRetries: 1,
    });
    const answer = await client.chat.completions.create({ model: MODEL, messages });
    return { text: answer.choices[0].message.content };
  },
};

const run = cases[caseName];
if (!run) {
  console.error(`unknown case ${caseName}; cases: ${Object.keys(cases).join(", ")}`);
  process.exit(2);
}
try {
  console.log(JSON.stringify(await run()));
} catch (e) {
  console.error(e?.stack ?? String(e));
  process.exit(1);
}
