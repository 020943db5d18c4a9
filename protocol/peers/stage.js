#!/usr/bin/env node
// A jacana protocol peer in JavaScript (Node.js >= 16, no dependencies).
//
// Stage "quadratic":  y = a * x**2 + b   (params a, b: float64 scalars; input x: float64[n], differentiable)
// Kinds served: hello, describe, apply, jacobian, jvp, vjp; anything else is answered with an error message.
// Transport: frames on stdin/stdout (u64 little-endian length, then one message), see protocol/SPEC.md.
//   node stage.js [--n 4]
"use strict";

const crypto = require("crypto");

const MAGIC = "JCNA";
const PROTOCOL = "jacana-stage";
const MAX_BYTES = 64 * 1024 * 1024;
const ITEMSIZE = { float64: 8, float32: 4 };

let N = 4;
const nIdx = process.argv.indexOf("--n");
if (nIdx >= 0) N = parseInt(process.argv[nIdx + 1], 10);

class ProtocolError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

function decode(buf) {
  if (buf.length < 8) throw new ProtocolError("truncated", "message shorter than its prefix");
  if (buf.toString("latin1", 0, 4) !== MAGIC) throw new ProtocolError("malformed", "bad magic");
  const hlen = buf.readUInt32LE(4);
  if ((8 + hlen) % 8 !== 0) throw new ProtocolError("malformed", "unaligned header");
  if (8 + hlen > buf.length) throw new ProtocolError("truncated", "header runs past the message");
  let header;
  try { header = JSON.parse(buf.toString("utf8", 8, 8 + hlen)); }
  catch (e) { throw new ProtocolError("malformed", "header is not JSON"); }
  if (header === null || typeof header !== "object" || Array.isArray(header))
    throw new ProtocolError("malformed", "header is not an object");
  if (header.protocol !== PROTOCOL) throw new ProtocolError("version", "not the jacana-stage protocol");
  const m = /^(\d+)\.(\d+)$/.exec(String(header.version));
  if (!m || m[1] !== "1") throw new ProtocolError("version", `unsupported version ${header.version}`);
  if (!Array.isArray(header.tensors)) throw new ProtocolError("malformed", "tensors must be a list");
  const payload = buf.subarray(8 + hlen);
  if (payload.length !== header.payload_nbytes) throw new ProtocolError("truncated", "payload size mismatch");
  const tensors = {};
  const raw = {};
  for (const t of header.tensors) {
    const size = ITEMSIZE[t.dtype];
    if (!size) throw new ProtocolError("dtype", `tensor ${t.name}: dtype ${t.dtype} not served by this peer`);
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isInteger(d) && d >= 0))
      throw new ProtocolError("malformed", `tensor ${t.name}: bad shape`);
    const count = t.shape.reduce((p, d) => p * d, 1);
    if (t.nbytes !== count * size || t.offset % 8 !== 0 || t.offset + t.nbytes > payload.length)
      throw new ProtocolError("malformed", `tensor ${t.name}: bad offset or size`);
    const bytes = payload.subarray(t.offset, t.offset + t.nbytes);
    const values = new Float64Array(count);
    for (let i = 0; i < count; i++)
      values[i] = size === 8 ? bytes.readDoubleLE(8 * i) : bytes.readFloatLE(4 * i);
    tensors[t.name] = { shape: t.shape, values };
    raw[t.name] = { dtype: t.dtype, shape: t.shape, bytes };
  }
  return { header, tensors, raw };
}

function encode(fields, tensors) {
  // tensors: list of [name, shape, Float64Array, axes|null]; all float64 little-endian
  const entries = [];
  const parts = [];
  let offset = 0;
  for (const [name, shape, values, axes] of tensors) {
    const start = Math.ceil(offset / 8) * 8;
    if (start > offset) parts.push(Buffer.alloc(start - offset));
    const b = Buffer.alloc(values.length * 8);
    values.forEach((v, i) => b.writeDoubleLE(v, 8 * i));
    parts.push(b);
    const entry = { name, dtype: "float64", shape, offset: start, nbytes: b.length };
    if (axes) entry.axes = axes;
    entries.push(entry);
    offset = start + b.length;
  }
  const header = Object.assign({ protocol: PROTOCOL, version: "1.0", role: "response" }, fields,
                               { tensors: entries, payload_nbytes: offset });
  let h = Buffer.from(JSON.stringify(header), "utf8");
  const pad = (8 - ((8 + h.length) % 8)) % 8;
  h = Buffer.concat([h, Buffer.alloc(pad, " ")]);
  const prefix = Buffer.alloc(8);
  prefix.write(MAGIC, 0, "latin1");
  prefix.writeUInt32LE(h.length, 4);
  return Buffer.concat([prefix, h, ...parts]);
}

function paramsDigest(raw, names) {
  const h = crypto.createHash("sha256");
  for (const name of [...names].sort()) {
    const t = raw[name];
    h.update(`${name}\n${t.dtype}\n${t.shape.join(",")}\n`, "utf8");
    h.update(t.bytes);
  }
  return "sha256:" + h.digest("hex");
}

function spec(n) {
  return {
    stage: "quadratic",
    params: [{ name: "a", shape: [], dtype: "float64" }, { name: "b", shape: [], dtype: "float64" }],
    inputs: [{ name: "x", shape: [n], dtype: "float64", differentiable: true }],
    outputs: [{ name: "y", shape: [n], dtype: "float64", axes: ["bin"] }],
  };
}

function need(tensors, name, n) {
  const t = tensors[name];
  if (!t) throw new ProtocolError("stage", `missing tensor ${name}`);
  if (n !== undefined && t.values.length !== n) throw new ProtocolError("stage", `tensor ${name} has the wrong size`);
  return t.values;
}

function handle(buf) {
  const { header, tensors, raw } = decode(buf);
  const echo = { kind: header.kind, stage: "quadratic" };
  if (header.step !== undefined && header.step !== null) echo.step = header.step;
  const params = header.params || { names: [], digest: "" };
  if (params.digest) echo.params = { names: [], digest: params.digest };
  if (header.provenance && header.provenance.length) echo.provenance = header.provenance;
  if (header.role !== "request") throw new ProtocolError("malformed", "expected a request");
  if (header.kind === "hello") return encode(Object.assign(echo, { meta: { stage: "quadratic" } }), []);
  if (header.kind === "describe") {
    let n = N;
    const over = header.meta && header.meta.inputs;
    if (Array.isArray(over)) for (const s of over) if (s.name === "x") n = s.shape[0];
    return encode(Object.assign(echo, { meta: { spec: spec(n) } }), []);
  }
  if (params.digest && paramsDigest(raw, params.names) !== params.digest)
    throw new ProtocolError("malformed", "params digest does not match the parameter tensors");
  const a = need(tensors, "a", 1)[0];
  const b = need(tensors, "b", 1)[0];
  const x = need(tensors, "x");
  const n = x.length;
  const y = x.map((xi) => a * xi * xi + b);
  const wrt = header.wrt && header.wrt.length ? header.wrt : ["a", "b", "x"];
  for (const w of wrt) if (!["a", "b", "x"].includes(w)) throw new ProtocolError("stage", `cannot differentiate w.r.t. ${w}`);
  if (header.kind === "apply") return encode(echo, [["y", [n], y, ["bin"]]]);
  if (header.kind === "jacobian") {
    const cols = wrt.reduce((c, w) => c + (w === "x" ? n : 1), 0);
    const J = new Float64Array(n * cols);
    for (let i = 0; i < n; i++) {
      let c = 0;
      for (const w of wrt) {
        if (w === "a") J[i * cols + c++] = x[i] * x[i];
        else if (w === "b") J[i * cols + c++] = 1;
        else { J[i * cols + c + i] = 2 * a * x[i]; c += n; }
      }
    }
    return encode(Object.assign(echo, { wrt }), [["y", [n], y, ["bin"]], ["jacobian:y", [n, cols], J, ["bin", "wrt"]]]);
  }
  if (header.kind === "jvp") {
    const ta = tensors["tangent:a"] ? tensors["tangent:a"].values[0] : 0;
    const tb = tensors["tangent:b"] ? tensors["tangent:b"].values[0] : 0;
    const tx = tensors["tangent:x"] ? need(tensors, "tangent:x", n) : new Float64Array(n);
    const ty = x.map((xi, i) => xi * xi * ta + tb + 2 * a * xi * tx[i]);
    return encode(echo, [["y", [n], y], ["tangent:y", [n], ty]]);
  }
  if (header.kind === "vjp") {
    const ct = need(tensors, "cotangent:y", n);
    const out = [];
    for (const w of wrt) {
      if (w === "a") out.push(["cotangent:a", [], Float64Array.of(x.reduce((s, xi, i) => s + ct[i] * xi * xi, 0))]);
      else if (w === "b") out.push(["cotangent:b", [], Float64Array.of(ct.reduce((s, c) => s + c, 0))]);
      else out.push(["cotangent:x", [n], x.map((xi, i) => ct[i] * 2 * a * xi)]);
    }
    return encode(Object.assign(echo, { wrt }), out);
  }
  throw new ProtocolError("malformed", `unsupported kind ${header.kind}`);
}

function errorReply(e) {
  const code = e instanceof ProtocolError ? e.code : "stage";
  return encode({ kind: "error", stage: "quadratic", meta: { error: { code, message: String(e.message) } } }, []);
}

let pending = Buffer.alloc(0);
process.stdin.on("data", (chunk) => {
  pending = Buffer.concat([pending, chunk]);
  while (pending.length >= 8) {
    const n = pending.readBigUInt64LE(0);
    if (n > BigInt(MAX_BYTES)) {
      writeFrame(errorReply(new ProtocolError("too_large", "frame exceeds the peer's limit")));
      process.exit(1);
    }
    const len = Number(n);
    if (pending.length < 8 + len) break;
    const msg = pending.subarray(8, 8 + len);
    pending = pending.subarray(8 + len);
    let reply;
    try { reply = handle(msg); } catch (e) { reply = errorReply(e); }
    writeFrame(reply);
  }
});
process.stdin.on("end", () => process.exit(0));

function writeFrame(buf) {
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(buf.length), 0);
  process.stdout.write(Buffer.concat([head, buf]));
}
