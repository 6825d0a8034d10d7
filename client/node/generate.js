#!/usr/bin/env node
// Streams one generation from a nanovllm-grpc server and prints the text as it arrives: the Node.js twin of
// `nanovllm generate`, with its flags and its --json lines. The API comes from proto/generate.proto at run time
// (@grpc/proto-loader): no generated code.
//
//   node generate.js --addr 127.0.0.1:50051 --prompt "The quick brown fox" --max-tokens 32
//   node generate.js --chat "Hello!" --system "You are terse." --temperature 0 --logprobs 2 --json
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "generate.proto");

// As `nanovllm generate`: flags marked `multiple` take several values (`--stop-token-ids 5 6`), repeated
// flags add to them, and comma-separated ids are split. `help` is this script's own, for --help.
const FLAGS = {
  addr: { type: "string", default: "127.0.0.1:50051", help: "server address (default: 127.0.0.1:50051)" },
  prompt: { type: "string", help: "a text prompt" },
  "prompt-token-ids": { type: "string", help: "comma-separated token ids" },
  chat: { type: "string", help: "a user message, rendered with the model's chat template" },
  system: { type: "string", help: "a system message before --chat" },
  "max-tokens": { type: "string", help: "tokens to generate at most (default: the server's, 16)" },
  temperature: { type: "string", help: "0: greedy (default: the server's, 1.0)" },
  "top-p": { type: "string", help: "nucleus share, in (0, 1] (default: the server's, 1.0)" },
  "top-k": { type: "string", help: "best k tokens only; 0 or -1: all (default: the server's, 0)" },
  "min-p": { type: "string", help: "drop tokens below min-p x the best's probability (default: 0)" },
  seed: { type: "string", help: "makes sampling reproducible, 0 to 2^64-1 (default: none)" },
  stop: { type: "string", multiple: true, help: "stop strings, left out of the text (default: none)" },
  "stop-token-ids": { type: "string", multiple: true, help: "stop tokens, kept in the output (default: none)" },
  "min-tokens": { type: "string", help: "no EOS or stop token before this many (default: 0)" },
  "ignore-eos": { type: "boolean", default: false, help: "generate --max-tokens whatever the model says" },
  logprobs: { type: "string", help: "top logprobs per token, with --json (default: 0, none)" },
  timeout: { type: "string", help: "seconds: the call's deadline (default: none)" },
  "tls-ca": { type: "string", help: "connect with TLS, trusting this PEM CA certificate" },
  json: { type: "boolean", default: false, help: "one JSON object per streamed message, as nanovllm generate --json" },
  // Structured output, at most one: every token keeps the output valid, and it ends once complete.
  "json-schema": { type: "string", help: "a JSON schema, as JSON text: the output is valid against it" },
  regex: { type: "string", help: "the whole output matches this regex" },
  grammar: { type: "string", help: "EBNF in xgrammar's dialect (root ::= ...)" },
  "structural-tag": { type: "string", help: "xgrammar's structural tag, as JSON text" },
  "json-object": { type: "boolean", default: false, help: "the output is any JSON object" },
  choice: { type: "string", multiple: true, help: "the output is exactly one of these strings" },
  help: { type: "boolean", default: false, help: "show this help" },
};
const OPTIONS = Object.fromEntries(Object.entries(FLAGS).map(([name, { help, ...option }]) => [name, option]));

// The proto field each numeric flag sets, and the range its type can carry; the server checks the rest
// (e.g. max_tokens >= 1) and answers INVALID_ARGUMENT with its own message.
const UINT32 = [0n, 2n ** 32n - 1n];
const INTEGERS = {
  "max-tokens": ["max_tokens", UINT32],
  "top-k": ["top_k", [-(2n ** 31n), 2n ** 31n - 1n]],
  seed: ["seed", [0n, 2n ** 64n - 1n]],
  "min-tokens": ["min_tokens", UINT32],
  logprobs: ["logprobs", UINT32],
};
const FLOATS = { temperature: "temperature", "top-p": "top_p", "min-p": "min_p" };
const FINISH_NAMES = {
  FINISH_REASON_UNSPECIFIED: null,
  FINISH_REASON_STOP: "stop",
  FINISH_REASON_LENGTH: "length",
  FINISH_REASON_ABORT: "abort",
};

function usage() {
  const lines = Object.entries(FLAGS).map(([name, { type, multiple, help }]) => {
    const value = type === "string" ? (multiple ? " V [V ...]" : " V") : "";
    return `  --${(name + value).padEnd(26)} ${help}`;
  });
  return ["usage: node generate.js (--prompt TEXT | --prompt-token-ids 1,2,3 | --chat TEXT) [flags]", ...lines].join("\n");
}

// An integer flag's value as a decimal string (exact for 64-bit seeds), or an error naming the flag and range.
function integer(flag, text, [lo, hi]) {
  const value = /^\s*[+-]?\d+\s*$/.test(text) ? BigInt(text.trim()) : null;
  if (value === null || value < lo || value > hi) {
    throw new Error(`--${flag} must be an integer in [${lo}, ${hi}], got ${JSON.stringify(text)}`);
  }
  return value.toString();
}

function tokenIds(flag, values) {
  const parts = values.flatMap((v) => v.split(",")).filter((t) => t.trim());
  const [lo, hi] = UINT32;
  const ids = parts.map((t) => (/^\s*\d+\s*$/.test(t) ? BigInt(t.trim()) : -1n));
  if (ids.some((id) => id < lo || id > hi)) {
    throw new Error(`--${flag} must be token ids in [${lo}, ${hi}], got ${JSON.stringify(values.join(" "))}`);
  }
  return ids.map(Number);
}

// parseArgs as `nanovllm generate` (argparse) parses: a negative number is a value (`--top-k -1`), and a bare value
// after a multi-value flag is one more of its values.
function parse(argv) {
  const args = [];
  for (const arg of argv) {
    const prev = args.length ? /^--([^=]+)$/.exec(args[args.length - 1]) : null;
    if (prev && OPTIONS[prev[1]]?.type === "string" && /^-\.?\d/.test(arg)) args[args.length - 1] += `=${arg}`;
    else args.push(arg);
  }
  const { values, tokens } = parseArgs({ args, options: OPTIONS, strict: true, allowPositionals: true, tokens: true });
  let last = null;
  for (const token of tokens) {
    if (token.kind === "option") {
      last = OPTIONS[token.name].multiple && token.inlineValue !== true ? token.name : null;
    } else if (token.kind === "positional") {
      if (last === null) throw new Error(`unexpected argument ${JSON.stringify(token.value)}`);
      values[last].push(token.value);
    }
  }
  return values;
}

function request(args) {
  const sources = ["prompt", "prompt-token-ids", "chat"].filter((k) => args[k] !== undefined);
  if (sources.length !== 1) throw new Error("give exactly one of --prompt, --prompt-token-ids, --chat");
  const req = { sampling: { stop: args.stop || [], ignore_eos: args["ignore-eos"] } };
  if (args.prompt !== undefined) req.text = args.prompt;
  if (args["prompt-token-ids"] !== undefined) req.token_ids = { ids: tokenIds("prompt-token-ids", [args["prompt-token-ids"]]) };
  if (args.chat !== undefined) {
    const messages = args.system ? [{ role: "system", content: args.system }] : [];
    messages.push({ role: "user", content: args.chat });
    req.chat = { messages };
  }
  req.sampling.stop_token_ids = tokenIds("stop-token-ids", args["stop-token-ids"] || []);
  // Unset fields stay unset, so the server applies its (vLLM's) defaults.
  for (const [flag, [field, range]] of Object.entries(INTEGERS)) {
    if (args[flag] !== undefined) req.sampling[field] = integer(flag, args[flag], range);
  }
  for (const [flag, field] of Object.entries(FLOATS)) {
    if (args[flag] === undefined) continue;
    const value = args[flag].trim() === "" ? NaN : Number(args[flag]);
    if (!Number.isFinite(value)) throw new Error(`--${flag} must be a number, got ${JSON.stringify(args[flag])}`);
    req.sampling[field] = value;
  }
  const constraints = { "json-schema": "json_schema", regex: "regex", grammar: "grammar" };
  constraints["structural-tag"] = "structural_tag";
  const given = Object.keys(constraints).filter((k) => args[k] !== undefined);
  if (args["json-object"]) given.push("json-object");
  if (args.choice) given.push("choice");
  if (given.length > 1) throw new Error(`give at most one constraint, got --${given.join(", --")}`);
  for (const [flag, field] of Object.entries(constraints)) {
    if (args[flag] !== undefined) req.sampling[field] = args[flag];
  }
  if (args["json-object"]) req.sampling.json_object = true;
  if (args.choice) req.sampling.choice = { choices: args.choice };
  return req;
}

function deadline(args) {
  if (args.timeout === undefined) return {};
  const seconds = Number(args.timeout);
  if (!(seconds > 0) || !Number.isFinite(seconds)) {
    throw new Error(`--timeout must be a positive number of seconds, got ${JSON.stringify(args.timeout)}`);
  }
  return { deadline: Date.now() + 1000 * seconds };
}

// The object `nanovllm generate --json` prints for one streamed message (client/cli.py).
function asJson(msg) {
  const out = { token_ids: msg.token_ids, text: msg.text, finish_reason: FINISH_NAMES[msg.finish_reason] };
  if (msg.logprobs.length) {
    out.logprobs = msg.logprobs.map((lp) => ({
      token_id: lp.token_id,
      logprob: lp.logprob,
      top: Object.fromEntries(lp.top.map((t) => [t.token_id, t.logprob])),
    }));
  }
  if (msg.usage) {
    const u = msg.usage;
    out.usage = {
      prompt_tokens: u.prompt_tokens,
      completion_tokens: u.completion_tokens,
      cached_prompt_tokens: u.cached_prompt_tokens,
    };
  }
  return out;
}

function client(args) {
  const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
  const { Generation } = grpc.loadPackageDefinition(def).nanovllm.v1;
  const creds = args["tls-ca"]
    ? grpc.credentials.createSsl(fs.readFileSync(args["tls-ca"]))
    : grpc.credentials.createInsecure();
  return new Generation(args.addr, creds);
}

function main() {
  let args;
  let req;
  let options;
  try {
    args = parse(process.argv.slice(2));
    if (args.help) {
      console.log(usage());
      return;
    }
    req = request(args);
    options = deadline(args);
  } catch (e) {
    console.error(`nanovllm: ${e.message.replace(/\s*\n\s*/g, " ")} (--help lists the flags)`);
    process.exitCode = 2;
    return;
  }
  const call = client(args).Generate(req, options);
  call.on("data", (msg) => {
    if (args.json) {
      process.stdout.write(JSON.stringify(asJson(msg)) + "\n");
      return;
    }
    process.stdout.write(msg.text);
    const reason = FINISH_NAMES[msg.finish_reason];
    if (reason) {
      const u = msg.usage;
      process.stdout.write("\n");
      console.error(`[${reason}: ${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens]`);
    }
  });
  call.on("error", (e) => {
    const name = Object.keys(grpc.status).find((k) => grpc.status[k] === e.code) || e.code;
    console.error(`nanovllm: ${name}: ${e.details}`);
    process.exitCode = 1;
  });
}

main();
