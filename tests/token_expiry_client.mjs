// socket.io-client (the official one) whose token expires while it is connected, for
// tests/test_token_expiry.py. Run from a directory where socket.io-client is installed:
//
//   TOKENS=<jwt>,<jwt> node token_expiry_client.mjs <url> <websocket|polling> <session_id> <rejoin|refused>
//
// Its `auth` function hands out TOKENS in turn. Prints one JSON line per thing that happens, with
// `t` in Unix seconds; exits after the second connection has rejoined (`rejoin`), or after the
// connect_error of the second attempt (`refused`).
import { io } from "socket.io-client";

const [url, transport, sessionId, until] = process.argv.slice(2);
const tokens = (process.env.TOKENS ?? "").split(",");
let issued = 0;
const say = (what) => console.log(JSON.stringify({ t: Date.now() / 1000, ...what }));
const finish = (code) => {
  socket.close();
  setTimeout(() => process.stdout.write("", () => process.exit(code)), 100);
};

const socket = io(url, {
  transports: [transport],
  reconnectionDelay: 200,
  randomizationFactor: 0,
  auth: (send) => {
    say({ auth: issued });
    send({ token: tokens[Math.min(issued++, tokens.length - 1)] });
  },
});
let connections = 0;
socket.on("connect", async () => {
  connections += 1;
  say({ connect: connections });
  const joined = await socket.emitWithAck("join", { session_id: sessionId });
  say({ joined: connections, ok: joined.ok, user_id: joined.ok ? joined.session.user_id : null });
  if (connections === 2 && until === "rejoin") finish(0);
});
socket.on("disconnect", (reason) => say({ disconnect: reason }));
socket.on("connect_error", (error) => {
  say({ connect_error: error.message });
  if (until === "refused") finish(0);
});
for (const name of ["user_message", "chunk", "done", "presence"]) {
  socket.on(name, () => say({ event: name, connection: connections }));
}
setTimeout(() => {
  say({ gave_up: true });
  finish(1);
}, 30_000);
