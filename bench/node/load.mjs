// Many sessions streaming at once: each connects (WebSocket only), starts a session and sends
// messages back to back for the given time, counting the chunks it receives. Prints JSON.
//
//   node load.mjs --urls http://127.0.0.1:8000,http://127.0.0.1:8001 --sessions 100 --seconds 10
// Sessions are spread over the URLs round robin, as a load balancer would.
import { io } from "socket.io-client";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const urls = arg("urls", "http://127.0.0.1:8000").split(",");
const sessions = Number(arg("sessions", "100"));
const seconds = Number(arg("seconds", "10"));
const warmup = Number(arg("warmup", "2"));

let chunks = 0;
let counting = false;
let turns = 0;
let failures = 0;

async function session(n) {
  const socket = io(urls[n % urls.length], { transports: ["websocket"], reconnection: false });
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", reject);
  });
  socket.on("chunk", () => {
    if (counting) chunks += 1;
  });
  const joined = await socket.emitWithAck("join", {});
  const sid = joined.session.session_id;
  const stop = Date.now() + (warmup + seconds) * 1000;
  while (Date.now() < stop) {
    const done = new Promise((resolve) => socket.once("done", resolve));
    const ack = await socket.emitWithAck("message", { session_id: sid, text: `load from session ${n}` });
    if (!ack.ok) {
      failures += 1;
      await new Promise((resolve) => setTimeout(resolve, 50));
      continue;
    }
    await done;
    if (counting) turns += 1;
  }
  socket.disconnect();
}

const running = Array.from({ length: sessions }, (_, n) => session(n));
await new Promise((resolve) => setTimeout(resolve, warmup * 1000));
counting = true;
const started = process.hrtime.bigint();
const cpuStart = process.cpuUsage();
await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
counting = false;
const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
const cpu = process.cpuUsage(cpuStart);
await Promise.allSettled(running);
console.log(
  JSON.stringify({
    chunks,
    turns,
    failures,
    seconds: elapsed,
    chunks_per_second: chunks / elapsed,
    generator_cpu_seconds: (cpu.user + cpu.system) / 1e6,
  }),
);
