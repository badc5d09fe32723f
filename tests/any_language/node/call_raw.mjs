#!/usr/bin/env node
// Raw Flight calls on plain gRPC, reporting exactly what came back: the gRPC status code, its
// details (the message) and every trailing metadata entry, as bytes decoded to text. The
// error tests use it to check what a non-Python Flight client receives.
//
// usage: node call_raw.mjs <grpc://host:port> <calls.json>
// calls.json: a JSON array of calls, each one of (any may add "token": "<API key>")
//   {"rpc": "DoAction", "type": "create_dataset", "body": "<base64>"}
//   {"rpc": "DoGet", "ticket": "<base64>"}
//   {"rpc": "GetFlightInfo", "descriptor": DESCRIPTOR}
//   {"rpc": "DoPut", "descriptor": DESCRIPTOR, "data_header": "<base64>"}
//   {"rpc": "ListFlights"}
// DESCRIPTOR: {"type": "CMD", "cmd": "<base64>"} or {"type": "PATH", "path": ["a", "b"]}.
// prints a JSON array, one object per call: {"rpc", "ok"} or {"rpc", "code", "details",
// "metadata": {key: text}}.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const DEADLINE_MS = 30_000; // per call, so a stuck server fails the test instead of hanging it

function connect(uri) {
  const m = /^grpc(\+tcp)?:\/\/(.+)$/.exec(uri);
  if (!m) throw new Error(`not a grpc:// URI: ${uri}`);
  const def = protoLoader.loadSync(fileURLToPath(new URL('./flight.proto', import.meta.url)), {
    keepCase: true, longs: String, enums: String, defaults: true,
  });
  const { FlightService } = grpc.loadPackageDefinition(def).arrow.flight.protocol;
  return new FlightService(m[2], grpc.credentials.createInsecure());
}

const bytes = (b64) => Buffer.from(b64 ?? '', 'base64');
const descriptor = (d) => (d.type === 'CMD'
  ? { type: 'CMD', cmd: bytes(d.cmd) }
  : { type: 'PATH', path: d.path });

function run(client, call, metadata) {
  const opts = { deadline: Date.now() + DEADLINE_MS };
  return new Promise((resolve, reject) => {
    let stream;
    switch (call.rpc) {
      case 'DoAction':
        stream = client.DoAction({ type: call.type, body: bytes(call.body) }, metadata, opts);
        break;
      case 'DoGet':
        stream = client.DoGet({ ticket: bytes(call.ticket) }, metadata, opts);
        break;
      case 'ListFlights':
        stream = client.ListFlights({ expression: Buffer.alloc(0) }, metadata, opts);
        break;
      case 'GetFlightInfo':
        client.GetFlightInfo(descriptor(call.descriptor), metadata, opts,
          (err) => (err ? reject(err) : resolve()));
        return;
      case 'DoPut':
        stream = client.DoPut(metadata, opts);
        stream.write({ flight_descriptor: descriptor(call.descriptor),
          data_header: bytes(call.data_header) });
        stream.end();
        break;
      default:
        reject(new Error(`unknown rpc ${call.rpc}`));
        return;
    }
    stream.on('data', () => {});
    stream.on('error', reject);
    stream.on('end', resolve);
  });
}

async function main() {
  const [uri, callsFile] = process.argv.slice(2);
  const calls = JSON.parse(readFileSync(callsFile, 'utf8'));
  const client = connect(uri);
  const out = [];
  for (const call of calls) {
    const metadata = new grpc.Metadata();
    if (call.token) metadata.set('authorization', `Bearer ${call.token}`);
    try {
      await run(client, call, metadata);
      out.push({ rpc: call.rpc, ok: true });
    } catch (err) {
      if (err.code === undefined) throw err;
      const trailers = {};
      for (const [key, value] of Object.entries(err.metadata?.getMap() ?? {})) {
        trailers[key] = Buffer.isBuffer(value) ? value.toString('utf8') : String(value);
      }
      out.push({ rpc: call.rpc, code: grpc.status[err.code], details: err.details,
        metadata: trailers });
    }
  }
  client.close();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => { console.error(err.stack ?? String(err)); process.exitCode = 1; });
