// One-shot chat with the realtime backend through the official socket.io-client.
//
//   node chat.mjs "How's the weather in Delhi?"                  # a new session
//   node chat.mjs "And tomorrow?" --session <uuid>               # the same session as another tab
//   node chat.mjs "hello" --url http://127.0.0.1:8000 --transport polling   # or SERVER_URL=...
//   CHAT_TOKEN=<jwt> node chat.mjs "hello"                        # when authentication is on
//
// Shows the session's last messages (--history, 50 by default) and, when there are earlier ones, a
// line saying where to read them (GET /api/sessions/<id>/events?before_event_id=), then streams the
// answer as it arrives, shows tool calls and a new title, and exits after `done`. Exit status: 0
// after `done`, 1 when the server refuses the chat or ends it (the session was deleted).
import { io } from "socket.io-client";

const USAGE = `usage: node chat.mjs [text] [--session <uuid>] [--url <server>] [--transport websocket|polling] [--token <jwt>] [--history <n>]

  --url        the server (default: SERVER_URL, else http://127.0.0.1:8000)
  --session    a session to join (default: a new one)
  --history    the last events shown when joining, 1 to 1000 (default: 50)
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
// The last messages, as a chat shows them: a session may hold thousands.
const history = Number(option("--history") ?? 50);
// With authentication on, the signed-in user's access token (e.g. Supabase's session.access_token).
const token = option("--token") ?? process.env.CHAT_TOKEN;
const text = args.join(" ") || "How's the weather in Delhi?";

// Frames: `ws`, under socket.io-client in Node, takes up to 100 MiB, far more than a page of events.
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
let answering = false; // an answer is being printed: a title waits for its end
let title = null;
socket.on("user_message", (m) => {
  answering = true;
  console.log(`you: ${m.text}`);
});
socket.on("chunk", (c) => process.stdout.write(c.text));
socket.on("tool_call", (c) => console.log(`\n  -> tool call ${c.name}(${JSON.stringify(c.args)})`));
socket.on("tool_result", (r) =>
  console.log(r.error ? `  <- tool error ${r.error.code}: ${r.error.message}` : `  <- tool result ${JSON.stringify(r.result)}`),
);
// With authentication on, the user's other sessions are announced too: only this one is shown.
let joinedId = null;
socket.on("session_updated", (s) => {
  if (s.session_id !== joinedId) return;
  if (answering) title = s.title;
  else console.log(`[title: ${s.title}]`);
});
socket.on("session_deleted", (s) => {
  if (s.session_id !== joinedId || exiting) return;
  console.log(`\n[session ${joinedId} was deleted; this chat is over]`);
  finish(1);
});
socket.on("done", (d) => {
  finished.add(d.turn_id);
  const usage = d.usage ? `, tokens in/out ${d.usage.input_tokens}/${d.usage.output_tokens}` : "";
  const error = d.error ? ` (${d.error.code}: ${d.error.message})` : "";
  console.log(`\n[done: ${d.finish_reason}${error}${usage}; stored as event ${d.event_id}]`);
  answering = false;
  if (title !== null) console.log(`[title: ${title}]`);
  title = null;
  if (d.turn_id === turnId) finish(0);
});

// A stored event, printed as the live one was.
const historyLine = ({ event_type: kind, content, finish_reason: ending }) => {
  if (kind === "tool_call" || kind === "tool_result") {
    let body = null;
    try {
      body = JSON.parse(content);
    } catch {}
    if (body && typeof body === "object" && "name" in body) {
      if (kind === "tool_call") return `  -> tool call ${body.name}(${JSON.stringify(body.args ?? {})})`;
      return body.error
        ? `  <- tool error ${body.error.code}: ${body.error.message}`
        : `  <- tool result ${JSON.stringify(body.result)}`;
    }
  }
  if (kind === "user_message") return `you: ${content}`;
  if (kind === "ai_message") return `assistant: ${content}${ending && ending !== "stop" ? ` [${ending}]` : ""}`;
  return `${kind}: ${content}`;
};

const showJoined = ({ session, history: events, history_more: more }) => {
  joinedId = session.session_id;
  console.log(`session ${joinedId}`);
  if (session.title) console.log(`[title: ${session.title}]`);
  if (more) {
    const earlier = `${url.replace(/\/$/, "")}/api/sessions/${joinedId}/events?before_event_id=${events[0].event_id}`;
    console.log(`[earlier messages not shown: GET ${earlier}]`);
  }
  for (const event of events) console.log(historyLine(event));
};

socket.on("connect", async () => {
  const request = { history_limit: history, ...(sessionId ? { session_id: sessionId } : {}) };
  const joined = await socket.emitWithAck("join", request);
  if (!joined.ok) return fail(`join refused: ${joined.error.code}: ${joined.error.message}`);
  showJoined(joined);
  const sent = await socket.emitWithAck("message", { session_id: joined.session.session_id, text });
  if (!sent.ok) return fail(`message refused: ${sent.error.code}: ${sent.error.message}`);
  turnId = sent.turn_id;
  if (finished.has(turnId)) finish(0);
});
