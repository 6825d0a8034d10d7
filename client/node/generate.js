#!/usr/bin/env node
// Streams one generation from a nanovllm-grpc server and prints the text as it arrives.
// The API comes from proto/generate.proto at run time (@grpc/proto-loader): no generated code.
//
//   node generate.js --addr 127.0.0.1:50051 --prompt "The quick brown fox" --max-tokens 32
//   node generate.js --chat "Hello!" --system "You are terse." --temperature 0
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "generate.proto");

const OPTIONS = {
  addr: { type: "string", default: "127.0.0.1:50051" },
  prompt: { type: "string" },
  "prompt-token-ids": { type: "string" }, // comma-separated
  chat: { type: "string" }, // a user message, rendered with the model's chat template
  system: { type: "string" }, // a system message before --chat
  "max-tokens": { type: "string" },
  temperature: { type: "string" },
  "top-p": { type: "string" },
  "top-k": { type: "string" },
  "min-p": { type: "string" },
  seed: { type: "string" },
  stop: { type: "string", multiple: true },
  "ignore-eos": { type: "boolean", default: false },
  timeout: { type: "string" }, // seconds: the call's deadline
  "tls-ca": { type: "string" }, // PEM CA certificate: connect with TLS
  json: { type: "boolean", default: false }, // one JSON object per streamed message
  // Structured output, at most one: every token keeps the output valid, and it ends once complete.
  "json-schema": { type: "string" }, // a JSON schema, as JSON text
  regex: { type: "string" }, // the whole output matches it
  grammar: { type: "string" }, // EBNF, in xgrammar's dialect (root ::= ...)
  "structural-tag": { type: "string" }, // xgrammar's structural tag, as JSON text
  "json-object": { type: "boolean", default: false }, // any JSON object
  choice: { type: "string", multiple: true }, // exactly one of these strings
  help: { type: "boolean", default: false },
};

function usage() {
  const flags = Object.keys(OPTIONS).map((k) => `--${k}`).join(" ");
  return `usage: node generate.js (--prompt TEXT | --prompt-token-ids 1,2,3 | --chat TEXT) [flags]\nflags: ${flags}`;
}

function request(args) {
  const sources = ["prompt", "prompt-token-ids", "chat"].filter((k) => args[k] !== undefined);
  if (sources.length !== 1) throw new Error("give exactly one of --prompt, --prompt-token-ids, --chat");
  const req = { sampling: { stop: args.stop || [], ignore_eos: args["ignore-eos"] } };
  if (args.prompt !== undefined) req.text = args.prompt;
  if (args["prompt-token-ids"] !== undefined) {
    req.token_ids = { ids: args["prompt-token-ids"].split(",").filter((t) => t.trim()).map(Number) };
  }
  if (args.chat !== undefined) {
    const messages = args.system ? [{ role: "system", content: args.system }] : [];
    messages.push({ role: "user", content: args.chat });
    req.chat = { messages };
  }
  // Unset fields stay unset, so the server applies its (vLLM's) defaults.
  const numbers = { "max-tokens": "max_tokens", temperature: "temperature", "top-p": "top_p" };
  Object.assign(numbers, { "top-k": "top_k", "min-p": "min_p", seed: "seed" });
  for (const [flag, field] of Object.entries(numbers)) {
    if (args[flag] === undefined) continue;
    const value = Number(args[flag]);
    if (Number.isNaN(value)) throw new Error(`--${flag} must be a number, got ${args[flag]}`);
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
  try {
    args = parseArgs({ options: OPTIONS, strict: true }).values;
    if (args.help) {
      console.log(usage());
      return;
    }
    req = request(args);
  } catch (e) {
    console.error(`nanovllm: ${e.message}\n${usage()}`);
    process.exitCode = 2;
    return;
  }
  const options = args.timeout ? { deadline: Date.now() + 1000 * Number(args.timeout) } : {};
  const call = client(args).Generate(req, options);
  call.on("data", (msg) => {
    if (args.json) {
      process.stdout.write(JSON.stringify(msg) + "\n");
    } else {
      process.stdout.write(msg.text);
    }
    if (msg.finish_reason !== "FINISH_REASON_UNSPECIFIED" && !args.json) {
      const reason = msg.finish_reason.replace("FINISH_REASON_", "").toLowerCase();
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
