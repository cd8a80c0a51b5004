// Load generator for the benchmarks: the official socket.io-client, WebSocket only.
//
// Streaming (default): `--sessions` sessions, each joined by `--tabs` sockets; the first tab sends
// messages back to back (the next once every tab has its `done`). Counts the chunks every tab
// receives, per-chunk latency (receipt minus the chunk's `ts`, both CLOCK_MONOTONIC on this
// machine) and message -> first chunk, during `--seconds` after `--warmup`.
//   node load.mjs --urls http://127.0.0.1:8000,http://127.0.0.1:8001 --sessions 100 --seconds 10
// Sessions are spread over the URLs round robin, as a load balancer would. `--stagger S` starts
// the sessions' first messages spread over S seconds (so paced streams do not tick in step).
// `--session-ids FILE` (one id a line): session n joins the n-th, a session stored beforehand,
// instead of a new one. `--warm-turns K`: counting starts after `--warmup` and once every session
// has finished K turns (at most `--warm-limit` seconds more); the result says how long that took.
//
// Sliced (`--slice S --rounds R --pids P1,P2`): each URL is a server of its own, and each gets
// `--sessions` x `--tabs` sockets. The servers take turns: in each of R rounds every server in turn
// gets the load alone for a slice (its sessions start over `--settle` seconds, then S seconds are
// counted, then new messages stop and the turns in flight finish), so all of them see the same
// minutes of this machine. Each slice's figures come back as one `slice` line, with the server's
// CPU over the counted seconds read from /proc/<pid>/task/*/schedstat.
//   node load.mjs --urls http://127.0.0.1:8000,http://127.0.0.1:8001 --pids 41,42 --slice 1 --rounds 10
//
// Idle: `--idle 1000,5000` opens that many sockets (each joins a session of its own), 100 at a
// time, and prints a checkpoint line at each count, then holds them `--hold` seconds.
//
// Prints JSON lines on stdout: {"phase":"measure"} when counting starts, {"phase":"end"} when it
// stops (so the caller can read the server's CPU over exactly that window), then the result.
import { io } from "socket.io-client";
import { readdirSync, readFileSync } from "node:fs";
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
const sessionIdsFile = arg("session-ids", "");
const sessionIds = sessionIdsFile ? readFileSync(sessionIdsFile, "utf8").split("\n").filter(Boolean) : [];
const warmTurns = Number(arg("warm-turns", "0"));
const warmLimit = Number(arg("warm-limit", "120"));
const hold = Number(arg("hold", "3"));
// Idle: after the last count, `--heartbeat S` seconds between two phase lines, for the CPU the
// server spends on Engine.IO's pings alone (one every 25 s per socket).
const heartbeat = Number(arg("heartbeat", "0"));
const slice = Number(arg("slice", "0"));
const rounds = Number(arg("rounds", "10"));
const settle = Number(arg("settle", "0.5"));
const pids = arg("pids", "").split(",").filter(Boolean).map(Number);

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
  let warm = 0; // sessions that finished `warmTurns` turns (or failed)

  async function session(n) {
    const url = urls[n % urls.length];
    let finished = 0;
    try {
      await drive(n, url, () => {
        finished += 1;
        if (finished === warmTurns) warm += 1;
      });
    } finally {
      if (finished < warmTurns) warm += 1;
    }
  }

  async function drive(n, url, onTurn) {
    const sockets = [await connect(url)];
    const sid = await join(sockets[0], sessionIds[n]);
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
      onTurn();
      if (counting) turns += 1;
    }
    for (const socket of sockets) socket.disconnect();
    if (reader) reader.close();
  }

  const running = Array.from({ length: sessions }, (_, n) => session(n));
  const connected = Promise.all(running.map((r) => r.catch((e) => e)));
  await sleep(warmup * 1000);
  const warmStarted = now();
  while (warmTurns && warm < sessions && now() - warmStarted < warmLimit * 1000) await sleep(50);
  const warmSeconds = warmup + (now() - warmStarted) / 1000;
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
    warm_seconds: warmSeconds,
    warm_sessions: warm,
  });
}

// The CPU time of every thread of a process, in seconds (schedstat: nanoseconds on the CPU).
function cpuOf(pid) {
  let ns = 0;
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${task}/schedstat`, "utf8").split(" ")[0]);
    } catch {
      // a thread that ended between the listing and the read
    }
  }
  return ns / 1e9;
}

async function sliced() {
  // One server's sessions, each with its tabs, joined once and reused for every slice.
  const servers = [];
  for (const url of urls) {
    const group = [];
    for (let n = 0; n < sessions; n++) {
      const sockets = [await connect(url)];
      const sid = await join(sockets[0]);
      for (let t = 1; t < tabs; t++) {
        sockets.push(await connect(url));
        await join(sockets[t], sid);
      }
      group.push({ n, sid, sockets });
    }
    servers.push(group);
  }

  let current = null; // the counted window of the slice under way, or null outside it
  for (const group of servers) {
    for (const s of group) {
      s.sentAt = null;
      for (const socket of s.sockets) {
        socket.on("chunk", (chunk) => {
          if (current === null) return;
          const at = now();
          current.chunks += 1;
          if (chunk.ts !== undefined) current.latencies.push(at - chunk.ts);
          if (socket === s.sockets[0] && chunk.index === 0 && s.sentAt !== null) current.first.push(at - s.sentAt);
        });
      }
    }
  }

  async function drive(s, state) {
    await sleep(Math.random() * settle * 500); // spread over the first half of the settling time
    while (state.open) {
      const done = s.sockets.map((socket) => new Promise((resolve) => socket.once("done", resolve)));
      s.sentAt = current !== null ? now() : null;
      const ack = await s.sockets[0].timeout(60000).emitWithAck("message", {
        session_id: s.sid,
        text: `load from session ${s.n}`,
      });
      if (!ack.ok) {
        state.failures += 1;
        await sleep(50);
        continue;
      }
      await Promise.all(done);
      if (current !== null) current.turns += 1;
    }
  }

  async function runSlice(index, round) {
    const state = { open: true, failures: 0 };
    const driving = servers[index].map((s) => drive(s, state));
    await sleep(settle * 1000);
    const window = { chunks: 0, turns: 0, latencies: [], first: [] };
    const cpuStart = pids.length ? cpuOf(pids[index]) : 0;
    const generatorStart = process.cpuUsage();
    const started = now();
    current = window;
    await sleep(slice * 1000);
    current = null;
    const elapsed = (now() - started) / 1000;
    const serverCpu = pids.length ? cpuOf(pids[index]) - cpuStart : null;
    const generator = process.cpuUsage(generatorStart);
    state.open = false;
    await Promise.all(driving);
    return {
      phase: "slice",
      server: index,
      round,
      seconds: elapsed,
      chunks: window.chunks,
      turns: window.turns,
      failures: state.failures,
      chunks_per_second: window.chunks / elapsed,
      latency_ms: summary(window.latencies),
      first_chunk_ms: summary(window.first),
      server_cpu_seconds: serverCpu,
      generator_cpu_seconds: (generator.user + generator.system) / 1e6,
    };
  }

  for (let index = 0; index < servers.length; index++) await runSlice(index, -1); // warm-up, not counted
  for (let round = 0; round < rounds; round++) {
    // Each round starts with the next server, so none always follows the same one.
    for (let k = 0; k < servers.length; k++) say(await runSlice((round + k) % servers.length, round));
  }
  for (const group of servers) for (const s of group) for (const socket of s.sockets) socket.disconnect();
  say({ rounds });
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
else if (slice) await sliced();
else await streaming();
process.exit(0);
