// One-shot chat with the realtime backend through the official socket.io-client.
//
//   node chat.mjs "How's the weather in Delhi?"                  # a new session
//   node chat.mjs "And tomorrow?" --session <uuid>               # the same session as another tab
//   node chat.mjs "hello" --url http://127.0.0.1:8000 --transport polling   # or SERVER_URL=...
//   CHAT_TOKEN=<jwt> node chat.mjs "hello"                        # when authentication is on
//
// Streams the answer as it arrives, shows tool calls, and exits after `done` (1 on a refusal).
import { io } from "socket.io-client";

const USAGE = `usage: node chat.mjs [text] [--session <uuid>] [--url <server>] [--transport websocket|polling] [--token <jwt>]

  --url        the server (default: SERVER_URL, else http://127.0.0.1:8000)
  --session    a session to join (default: a new one)
  --token      a JWT when authentication is on (default: CHAT_TOKEN)`;

const args = process.argv.slice(2);
if (args.includes("--help") || args.includes("-h")) {
  console.log(USAGE);
  process.exit(0);
}
const option = (name) => {
  const at = args.indexOf(name);
  return at >= 0 ? args.splice(at, 2)[1] : undefined;
};
const sessionId = option("--session");
const transport = option("--transport") ?? "websocket";
const url = option("--url") ?? process.env.SERVER_URL ?? "http://127.0.0.1:8000";
// With authentication on, the signed-in user's access token (e.g. Supabase's session.access_token).
const token = option("--token") ?? process.env.CHAT_TOKEN;
const text = args.join(" ") || "How's the weather in Delhi?";

const socket = io(url, { transports: [transport], reconnection: false, auth: token ? { token } : {} });
let turnId = null; // known once `message` is acknowledged
const finished = new Set();

// Exit explicitly: with polling, python-engineio keeps a closed client's last long-poll open
// until its ping timeout, and that open request would keep Node alive. The short wait lets
// the close packet reach the server first.
let exiting = false;
const finish = (code) => {
  exiting = true;
  socket.close();
  setTimeout(() => process.stdout.write("", () => process.exit(code)), 200);
};
const fail = (why) => {
  if (exiting) return;
  console.error(why);
  finish(1);
};

socket.on("connect_error", (err) =>
  fail(
    err.message === "unauthorized" || err.message === "rate_limited"
      ? `connection refused by ${url}: ${err.message}`
      : `cannot connect to ${url} (${err.message}); set the server with --url or SERVER_URL`,
  ),
);
socket.on("presence", ({ clients }) => console.log(`[${clients} tab(s) in this session]`));
socket.on("user_message", (m) => console.log(`you: ${m.text}`));
socket.on("chunk", (c) => process.stdout.write(c.text));
socket.on("tool_call", (c) => console.log(`\n  -> tool call ${c.name}(${JSON.stringify(c.args)})`));
socket.on("tool_result", (r) =>
  console.log(r.error ? `  <- tool error ${r.error.code}: ${r.error.message}` : `  <- tool result ${JSON.stringify(r.result)}`),
);
socket.on("done", (d) => {
  finished.add(d.turn_id);
  const usage = d.usage ? `, tokens in/out ${d.usage.input_tokens}/${d.usage.output_tokens}` : "";
  const error = d.error ? ` (${d.error.code}: ${d.error.message})` : "";
  console.log(`\n[done: ${d.finish_reason}${error}${usage}; stored as event ${d.event_id}]`);
  if (d.turn_id === turnId) finish(0);
});

socket.on("connect", async () => {
  const joined = await socket.emitWithAck("join", sessionId ? { session_id: sessionId } : {});
  if (!joined.ok) return fail(`join refused: ${joined.error.code}: ${joined.error.message}`);
  console.log(`session ${joined.session.session_id}`);
  const sent = await socket.emitWithAck("message", { session_id: joined.session.session_id, text });
  if (!sent.ok) return fail(`message refused: ${sent.error.code}: ${sent.error.message}`);
  turnId = sent.turn_id;
  if (finished.has(turnId)) finish(0);
});
