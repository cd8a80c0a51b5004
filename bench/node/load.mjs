// Load generator for the benchmarks: the official socket.io-client, WebSocket only.
//
// Streaming (default): `--sessions` sessions, each joined by `--tabs` sockets; the first tab sends
// messages back to back (the next once every tab has its `done`). Counts the chunks every tab
// receives, per-chunk latency (receipt minus the chunk's `ts`, both CLOCK_MONOTONIC on this
// machine) and message -> first chunk, during `--seconds` after `--warmup`.
//   node load.mjs --urls http://127.0.0.1:8000,http://127.0.0.1:8001 --sessions 100 --seconds 10
// Sessions are spread over the URLs round robin, as a load balancer would. `--stagger S` starts
// the sessions' first messages spread over S seconds (so paced streams do not tick in step).
//
// Idle: `--idle 1000,5000` opens that many sockets (each joins a session of its own), 100 at a
// time, and prints a checkpoint line at each count, then holds them `--hold` seconds.
//
// Prints JSON lines on stdout: {"phase":"measure"} when counting starts, {"phase":"end"} when it
// stops (so the caller can read the server's CPU over exactly that window), then the result.
import { io } from "socket.io-client";
import WebSocket from "ws";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const urls = arg("urls", "http://127.0.0.1:8000").split(",");
const sessions = Number(arg("sessions", "100"));
// A plain WebSocket client (/ws/session/{id}) that only reads, in each of the first N sessions.
const plain = Number(arg("plain", "0"));
const tabs = Number(arg("tabs", "1"));
const seconds = Number(arg("seconds", "10"));
const warmup = Number(arg("warmup", "2"));
const stagger = Number(arg("stagger", "0"));
const idle = arg("idle", "");
const hold = Number(arg("hold", "3"));
// Idle: after the last count, `--heartbeat S` seconds between two phase lines, for the CPU the
// server spends on Engine.IO's pings alone (one every 25 s per socket).
const heartbeat = Number(arg("heartbeat", "0"));

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => Number(process.hrtime.bigint()) / 1e6; // CLOCK_MONOTONIC, ms

async function connect(url) {
  const socket = io(url, { transports: ["websocket"], reconnection: false, timeout: 60000 });
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", reject);
  });
  return socket;
}

async function join(socket, sessionId) {
  const ack = await socket.timeout(60000).emitWithAck("join", sessionId ? { session_id: sessionId } : {});
  if (!ack.ok) throw new Error(`join refused: ${JSON.stringify(ack.error)}`);
  return ack.session.session_id;
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function summary(samples) {
  const sorted = Float64Array.from(samples).sort();
  return { n: sorted.length, p50: percentile(sorted, 50), p99: percentile(sorted, 99), max: percentile(sorted, 100) };
}

async function openPlain(url, sid) {
  const ws = new WebSocket(`${url.replace(/^http/, "ws")}/ws/session/${sid}`);
  await new Promise((resolve, reject) => {
    ws.once("message", resolve); // the `session` frame
    ws.once("error", reject);
  });
  return ws;
}

async function streaming() {
  let counting = false;
  let chunks = 0;
  let turns = 0;
  let failures = 0;
  let ended = false;
  const latencies = [];
  const firstChunk = [];

  async function session(n) {
    const url = urls[n % urls.length];
    const sockets = [await connect(url)];
    const sid = await join(sockets[0]);
    for (let t = 1; t < tabs; t++) {
      sockets.push(await connect(url));
      await join(sockets[t], sid);
    }
    const reader = n < plain ? await openPlain(url, sid) : null;
    let sentAt = null;
    for (const socket of sockets) {
      socket.on("chunk", (chunk) => {
        if (!counting) return;
        const at = now();
        chunks += 1;
        if (chunk.ts !== undefined) latencies.push(at - chunk.ts);
        if (socket === sockets[0] && chunk.index === 0 && sentAt !== null) firstChunk.push(at - sentAt);
      });
    }
    if (stagger) await sleep(Math.random() * stagger * 1000);
    while (!ended) {
      const done = sockets.map((socket) => new Promise((resolve) => socket.once("done", resolve)));
      sentAt = counting ? now() : null;
      const ack = await sockets[0].timeout(60000).emitWithAck("message", {
        session_id: sid,
        text: `load from session ${n}`,
      });
      if (!ack.ok) {
        failures += 1;
        await sleep(50);
        continue;
      }
      await Promise.all(done);
      if (counting) turns += 1;
    }
    for (const socket of sockets) socket.disconnect();
    if (reader) reader.close();
  }

  const running = Array.from({ length: sessions }, (_, n) => session(n));
  const connected = Promise.all(running.map((r) => r.catch((e) => e)));
  await sleep(warmup * 1000);
  say({ phase: "measure" });
  counting = true;
  const started = now();
  const cpuStart = process.cpuUsage();
  await sleep(seconds * 1000);
  counting = false;
  const elapsed = (now() - started) / 1000;
  const cpu = process.cpuUsage(cpuStart);
  say({ phase: "end" });
  ended = true;
  const outcomes = await connected;
  const errors = outcomes.filter((o) => o instanceof Error).map((e) => e.message);
  say({
    chunks,
    turns,
    failures,
    errors: errors.slice(0, 3),
    error_count: errors.length,
    seconds: elapsed,
    chunks_per_second: chunks / elapsed,
    latency_ms: summary(latencies),
    first_chunk_ms: summary(firstChunk),
    generator_cpu_seconds: (cpu.user + cpu.system) / 1e6,
  });
}

async function idleConnections() {
  const checkpoints = idle.split(",").map(Number);
  const sockets = [];
  const started = now();
  for (const target of checkpoints) {
    while (sockets.length < target) {
      const batch = Math.min(100, target - sockets.length);
      const opened = await Promise.all(
        Array.from({ length: batch }, async (_, i) => {
          const socket = await connect(urls[(sockets.length + i) % urls.length]);
          await join(socket);
          return socket;
        }),
      );
      sockets.push(...opened);
    }
    await sleep(hold * 1000); // let the server settle before its memory is read
    say({ phase: "checkpoint", connections: sockets.length, connect_seconds: (now() - started) / 1000 });
    await sleep(1000);
  }
  if (heartbeat > 0) {
    say({ phase: "heartbeat_start", connections: sockets.length });
    await sleep(heartbeat * 1000);
    say({ phase: "heartbeat_end", connections: sockets.length });
  }
  for (const socket of sockets) socket.disconnect();
  say({ connections: sockets.length });
}

if (idle) await idleConnections();
else await streaming();
process.exit(0);
