// One-shot chat with the realtime backend through the official socket.io-client.
//
//   node chat.mjs "How's the weather in Delhi?"                  # a new session
//   node chat.mjs "And tomorrow?" --session <uuid>               # the same session as another tab
//   SERVER_URL=http://127.0.0.1:8000 node chat.mjs "hello" --transport polling
//   CHAT_TOKEN=<jwt> node chat.mjs "hello"                        # when authentication is on
//
// Streams the answer as it arrives, shows tool calls, and exits after `done`.
import { io } from "socket.io-client";

const args = process.argv.slice(2);
const option = (name) => {
  const at = args.indexOf(name);
  return at >= 0 ? args.splice(at, 2)[1] : undefined;
};
const sessionId = option("--session");
const transport = option("--transport") ?? "websocket";
const text = args.join(" ") || "How's the weather in Delhi?";
const url = process.env.SERVER_URL ?? "http://127.0.0.1:8000";

// With authentication on, the signed-in user's access token (e.g. Supabase's session.access_token).
const token = option("--token") ?? process.env.CHAT_TOKEN;
const socket = io(url, { transports: [transport], reconnection: false, auth: token ? { token } : {} });
let turnId = null; // known once `message` is acknowledged
const finished = new Set();

// Exit explicitly: with polling, python-engineio keeps a closed client's last long-poll open
// until its ping timeout, and that open request would keep Node alive. The short wait lets
// the close packet reach the server first.
const finish = (code) => {
  socket.close();
  setTimeout(() => process.stdout.write("", () => process.exit(code)), 200);
};
const fail = (why) => {
  console.error(why);
  finish(1);
};

socket.on("connect_error", (err) => fail(`cannot connect to ${url}: ${err.message}`));
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
  if (!joined.ok) fail(`join refused: ${joined.error.code}: ${joined.error.message}`);
  console.log(`session ${joined.session.session_id}`);
  const sent = await socket.emitWithAck("message", { session_id: joined.session.session_id, text });
  if (!sent.ok) fail(`message refused: ${sent.error.code}: ${sent.error.message}`);
  turnId = sent.turn_id;
  if (finished.has(turnId)) finish(0);
});
