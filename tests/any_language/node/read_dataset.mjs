#!/usr/bin/env node
// Minimal Arrow Flight client, written from scratch on plain gRPC + Arrow IPC, to prove
// that Lavender Flight's wire is plain Arrow Flight (no pyarrow on this side).
//
// usage: node read_dataset.mjs <grpc://host:port> [dataset_name] [--token TOKEN]
// prints one JSON object on stdout; on a failed call exits 1 with "CODE: details" on stderr.
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import { tableFromIPC } from 'apache-arrow';

const DEADLINE_MS = 30_000; // per call, so a stuck server fails the test instead of hanging it

function parseArgs(argv) {
  const args = { positional: [], token: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--token') args.token = argv[++i];
    else args.positional.push(argv[i]);
  }
  const [uri, dataset] = args.positional;
  if (!/^grpc(\+tcp|\+tls)?:\/\/./.test(uri ?? '') || args.token === undefined) {
    console.error('usage: node read_dataset.mjs <grpc://host:port> [dataset_name] [--token TOKEN]');
    process.exit(2);
  }
  return { uri, dataset, token: args.token };
}

function connect(uri) {
  const m = /^grpc(\+tcp|\+tls)?:\/\/(.+)$/.exec(uri);
  const creds = m[1] === '+tls' ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
  const def = protoLoader.loadSync(fileURLToPath(new URL('./flight.proto', import.meta.url)), {
    keepCase: true, longs: String, enums: String, defaults: true,
  });
  const { FlightService } = grpc.loadPackageDefinition(def).arrow.flight.protocol;
  // grpc-js caps received messages at 4 MiB by default; Flight batches can be larger.
  return new FlightService(m[2], creds, { 'grpc.max_receive_message_length': -1 });
}

// Each FlightData is one Arrow IPC message split into header and body; re-add the
// encapsulation framing (continuation marker, metadata length, 8-byte padding) so a
// stock IPC stream reader can decode it.
function frame(header, body) {
  const padded = Math.ceil(header.length / 8) * 8;
  const prefix = Buffer.alloc(8);
  prefix.writeUInt32LE(0xffffffff, 0);
  prefix.writeInt32LE(padded, 4);
  return [prefix, header, Buffer.alloc(padded - header.length), body];
}
const EOS = Buffer.from([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);

// JSON has no int64/binary: safe integers stay numbers, others become strings; bytes -> base64.
function jsonValue(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'bigint') return Number.isSafeInteger(Number(v)) ? Number(v) : v.toString();
  if (typeof v === 'number') return Number.isFinite(v) ? v : String(v); // NaN/Infinity
  if (v instanceof Uint8Array) return Buffer.from(v).toString('base64');
  if (typeof v?.toArray === 'function') return Array.from(v.toArray(), jsonValue); // list
  if (typeof v?.toJSON === 'function' && !(v instanceof Date)) v = v.toJSON(); // struct/map row
  if (v?.constructor === Object) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, jsonValue(x)]));
  return v;
}

async function main() {
  const { uri, dataset, token } = parseArgs(process.argv.slice(2));
  const client = connect(uri);
  const metadata = () => {
    const md = new grpc.Metadata();
    if (token) md.set('authorization', `Bearer ${token}`);
    return md;
  };
  const opts = () => ({ deadline: Date.now() + DEADLINE_MS });
  // Run one RPC; tag its failure with the method name for the error message.
  const call = async (name, fn) => {
    try { return await fn(); } catch (err) { err.rpc = name; throw err; }
  };
  const unary = (name, req) => call(name, () => new Promise((resolve, reject) =>
    client[name](req, metadata(), opts(), (err, res) => (err ? reject(err) : resolve(res)))));
  const stream = (name, req) => call(name, () => client[name](req, metadata(), opts()).toArray());

  try {
    const out = {};
    const infos = await stream('ListFlights', { expression: Buffer.alloc(0) });
    out.datasets = infos.map((info) => ({
      name: info.flight_descriptor?.path?.[0] ?? null,
      total_records: jsonValue(BigInt(info.total_records)),
    }));

    if (dataset !== undefined) {
      const info = await unary('GetFlightInfo', { type: 'PATH', path: [dataset] });
      // Endpoints are read front to back; ours carry no locations = "same server".
      const tables = [];
      for (const ep of info.endpoint) {
        // A FlightData with no data_header carries only app_metadata, not an IPC message.
        const msgs = (await stream('DoGet', ep.ticket)).filter((d) => d.data_header.length);
        if (msgs.length === 0) continue;
        const ipc = Buffer.concat([...msgs.flatMap((d) => frame(d.data_header, d.data_body)), EOS]);
        tables.push(tableFromIPC(ipc)); // each DoGet stream starts with its own schema
      }
      // Prefer the schema advertised in FlightInfo, so it shows even with zero rows.
      const schema = info.schema.length
        ? tableFromIPC(Buffer.concat([info.schema, EOS])).schema
        : tables[0]?.schema;
      const fields = schema?.fields ?? [];
      out.schema = fields.map((f) => ({ name: f.name, type: String(f.type) }));
      const rows = [];
      for (const t of tables) {
        const cols = fields.map((f) => t.getChild(f.name));
        for (let i = 0; i < t.numRows; i++) {
          rows.push(Object.fromEntries(fields.map((f, j) => [f.name, jsonValue(cols[j]?.get(i))])));
        }
      }
      Object.assign(out, { num_rows: rows.length, rows });
      out.endpoints = info.endpoint.length;
    }
    process.stdout.write(JSON.stringify(out) + '\n');
  } catch (err) {
    const code = err.code !== undefined ? grpc.status[err.code] : 'CLIENT_ERROR';
    console.error(`${err.rpc ?? 'client'} failed: ${code}: ${err.details ?? err.message}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
