// A sessionmesh client in Node.js, from the shipped .proto alone (no generated code).
//
//   node client.js 127.0.0.1:PORT      (an agent serving examples/counter.py)
//   SESSIONMESH_TLS_CA=ca.pem SESSIONMESH_TOKEN=... node client.js 127.0.0.1:PORT   (TLS)
//
// Opens a session on the example counter, calls it three times (counts 1, 3, 6), streams a
// tool inside the session, reads the ErrorInfo reason of failing calls, and closes the
// session. Prints one JSON object per step.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync(path.join(PROTOS, "sessionmesh/v1/session_service.proto"), {
  includeDirs: [PROTOS],
  keepCase: true,
  defaults: true,
  oneofs: true,
});
const { SessionService } = grpc.loadPackageDefinition(definition).sessionmesh.v1;

// google.rpc.Status and ErrorInfo, the standard error details every sessionmesh error carries.
// Detail has the wire form of google.protobuf.Any.
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Detail { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Detail details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;
const Status = rpc.lookupType("google.rpc.Status");
const ErrorInfo = rpc.lookupType("google.rpc.ErrorInfo");

// JSON <-> google.protobuf.Value / Struct. protobufjs ships the well-known types with
// camelCase field names (numberValue, structValue, ...), whatever keepCase says.
function toValue(v) {
  if (v === null || v === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = toValue(v);
  return { fields };
}
function fromValue(v) {
  switch (v.kind) {
    case "numberValue": return v.numberValue;
    case "stringValue": return v.stringValue;
    case "boolValue": return v.boolValue;
    case "structValue": return fromStruct(v.structValue);
    case "listValue": return v.listValue.values.map(fromValue);
    default: return null;
  }
}
function fromStruct(s) {
  const out = {};
  for (const [k, v] of Object.entries(s.fields || {})) out[k] = fromValue(v);
  return out;
}

// The reason in a failed call's google.rpc.ErrorInfo (grpc-status-details-bin).
function errorReason(err) {
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return null;
  for (const detail of Status.decode(raw).details) {
    if (detail.type_url.endsWith("/google.rpc.ErrorInfo")) return ErrorInfo.decode(detail.value).reason;
  }
  return null;
}

const unary = (client, method, request, metadata = new grpc.Metadata()) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata, (err, response) => (err ? reject(err) : resolve(response))),
  );

function sessionMetadata(sessionId) {
  const md = new grpc.Metadata();
  md.set("x-session-id", sessionId);
  return md;
}

function streamCall(client, sessionId, tool, args) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = client.StreamCall(sessionMetadata(sessionId));
    call.on("data", (msg) => { if (msg.kind === "chunk") chunks.push(fromValue(msg.chunk)); });
    call.on("error", reject);
    call.on("end", () => resolve(chunks));
    // window 0: no credit-based flow control; half-closing ends the tool's input.
    call.write({ start: { call: { tool, arguments: toStruct(args) }, window: 0 } });
    call.end();
  });
}

const print = (step) => console.log(JSON.stringify(step));

// TLS from the same variables the sessionmesh CLI reads: SESSIONMESH_TLS_CA (verify the
// agent), SESSIONMESH_TLS_CERT + SESSIONMESH_TLS_KEY (a client certificate, for mutual TLS),
// SESSIONMESH_TOKEN (sent as "authorization: Bearer ..." with every call, over TLS only).
function credentials() {
  const env = process.env;
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  if (!env.SESSIONMESH_TLS_CA && !env.SESSIONMESH_TLS_CERT) {
    if (env.SESSIONMESH_TOKEN) throw new Error("SESSIONMESH_TOKEN is sent over TLS only");
    return grpc.credentials.createInsecure();
  }
  const tls = grpc.credentials.createSsl(
    read("SESSIONMESH_TLS_CA"), read("SESSIONMESH_TLS_KEY"), read("SESSIONMESH_TLS_CERT"),
  );
  if (!env.SESSIONMESH_TOKEN) return tls;
  const bearer = grpc.credentials.createFromMetadataGenerator((_, callback) => {
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${env.SESSIONMESH_TOKEN}`);
    callback(null, md);
  });
  return grpc.credentials.combineChannelCredentials(tls, bearer);
}

async function main() {
  const address = process.argv[2];
  if (!address) throw new Error("usage: node client.js HOST:PORT");
  const client = new SessionService(address, credentials());
  try {
    const { session } = await unary(client, "CreateSession", { tool: "session_counter" });
    print({ step: "create", session: session.id });

    for (const n of [1, 2, 3]) {
      const response = await unary(
        client, "Call", { tool: "session_counter", arguments: toStruct({ increment: n }) },
        sessionMetadata(session.id),
      );
      print({ step: "call", increment: n, count: fromValue(response.result).count });
    }

    const chunks = await streamCall(client, session.id, "stream_count", { start: 1, n: 3 });
    print({ step: "stream", chunks });

    try {
      await unary(client, "Call", { tool: "no_such_tool" }, sessionMetadata(session.id));
    } catch (err) {
      print({ step: "error", code: grpc.status[err.code], reason: errorReason(err) });
    }

    const closed = await unary(client, "CloseSession", { session_id: session.id });
    print({ step: "close", closed: closed.closed });

    try {
      await unary(client, "Call", { tool: "session_counter" }, sessionMetadata(session.id));
    } catch (err) {
      print({ step: "after-close", code: grpc.status[err.code], reason: errorReason(err) });
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
