// Tool calls that wait for a person's approval (the service's TOOL_APPROVAL): inside the call's
// `<details class="tool">`, Approve and Deny (`approve_tool`) with an optional reason and a countdown
// to the call's `expires_at`, then the decision as any tab, or the stored history, tells it.

const TICK_MS = 1000;

const hooks = {
  // Set by setUpApprovals: send `approve_tool`, and word a refusal for a person.
  decide: async () => ({ ok: false, error: { code: "unavailable", message: "not set up" } }),
  describeRefusal: (error) => `${error.message} (${error.code})`,
};

const waiting = new Set(); // the entries whose controls are shown
let ticker = null;

/** `decide(callId, approved, reason)` answers with the ack; `describeRefusal(error)` words a refusal. */
export function setUpApprovals({ decide, describeRefusal }) {
  hooks.decide = decide;
  hooks.describeRefusal = describeRefusal;
}

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function button(className, text) {
  const element = node("button", className, text);
  element.type = "button";
  return element;
}

// ---------- the countdown ----------

function remaining(expiresAt) {
  const seconds = Math.max(0, Math.ceil((expiresAt - Date.now()) / 1000));
  const [h, m, s] = [Math.floor(seconds / 3600), Math.floor(seconds / 60) % 60, seconds % 60];
  const two = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(s)}` : `${m}:${two(s)}`;
}

function tick() {
  for (const entry of waiting) {
    if (!Number.isNaN(entry.expiresAt)) entry.countdown.textContent = remaining(entry.expiresAt);
  }
  if (!waiting.size && ticker !== null) {
    clearInterval(ticker);
    ticker = null;
  }
}

function startTicking() {
  tick();
  if (ticker === null && waiting.size) ticker = setInterval(tick, TICK_MS);
}

// ---------- a call's approval block ----------

// The block sits under the call's summary: "Approval", then the controls or the decision.
function entryOf(view) {
  if (view.approval) return view.approval;
  const block = node("div", "tool-approval");
  const outcome = node("p", "tool-approval-outcome");
  const refusal = node("p", "refusal", "");
  outcome.hidden = true;
  refusal.hidden = true;
  refusal.setAttribute("role", "alert");
  block.append(node("h3", null, "Approval"), outcome, refusal);
  view.details.querySelector("summary").after(block);
  view.approval = { view, block, outcome, refusal, controls: null, decision: null, expiresAt: NaN };
  return view.approval;
}

function buildControls(entry, name) {
  const controls = node("div", "tool-approval-controls");
  controls.setAttribute("role", "group");
  controls.setAttribute("aria-label", `Approve or deny this call to ${name}`);
  const label = node("label", "tool-reason", "Reason (optional)");
  const reason = node("input");
  reason.type = "text";
  reason.maxLength = 1000; // the service's limit for a reason
  reason.autocomplete = "off";
  label.append(reason);
  const approve = button("approve", "Approve");
  const deny = button("deny", "Deny");
  approve.addEventListener("click", () => decide(entry, true, approve));
  deny.addEventListener("click", () => decide(entry, false, deny));
  const actions = node("div", "tool-approval-actions");
  actions.append(approve, deny);
  controls.append(label, actions);
  Object.assign(entry, { controls, reason, buttons: [approve, deny] });
  entry.block.insertBefore(controls, entry.outcome);
}

function setBusy(entry, busy) {
  for (const element of entry.buttons) element.disabled = busy;
  entry.reason.readOnly = busy;
  entry.controls.setAttribute("aria-busy", String(busy));
}

function showRefusal(entry, text) {
  entry.refusal.textContent = text ?? "";
  entry.refusal.hidden = !text;
}

// A disabled or removed button drops the focus to the page's top: it goes back near where it was.
function keepFocus(entry, element) {
  if (entry.hadFocus && (document.activeElement === document.body || !document.activeElement)) element.focus();
  entry.hadFocus = false;
}

async function decide(entry, approved, pressed) {
  entry.hadFocus = entry.controls.contains(document.activeElement);
  setBusy(entry, true);
  showRefusal(entry, null);
  const reason = entry.reason.value.trim();
  const answer = await hooks.decide(entry.view.callId, approved, reason || null);
  // Accepted: `tool_approval_result` replaces the controls (it may have come before the ack).
  if (answer.ok) return;
  showRefusal(entry, hooks.describeRefusal(answer.error));
  // Decided already, timed out or stopped: the call waits no more; anything else may be tried again.
  const retry = answer.error.code !== "no_pending_approval" && entry.controls;
  if (retry) setBusy(entry, false);
  keepFocus(entry, retry ? pressed : entry.view.details.querySelector("summary"));
}

/** The call waits for a decision until `expires_at`: its controls, open, with a countdown. */
export function awaitDecision(view, { name, expires_at }) {
  const result = view.details.dataset.outcome;
  if (result === "ok" || result === "error" || view.approval?.decision) return; // decided already
  const entry = entryOf(view);
  entry.expiresAt = Date.parse(expires_at);
  if (!entry.controls) {
    buildControls(entry, name);
    entry.countdown = node("span", "tool-countdown");
    entry.countdown.setAttribute("role", "timer"); // not read out at every tick, unlike the log
    const until = Number.isNaN(entry.expiresAt) ? [] : [" · ", entry.countdown];
    view.status.replaceChildren("waiting for approval", ...until);
    view.details.dataset.outcome = "waiting";
    view.details.open = true;
    entry.outcome.hidden = true;
    waiting.add(entry);
  }
  startTicking();
}

function endWaiting(entry) {
  if (!entry.controls) return;
  entry.hadFocus ||= entry.controls.contains(document.activeElement);
  entry.controls.remove();
  entry.controls = null;
  waiting.delete(entry);
  if (entry.view.details.dataset.outcome === "waiting") delete entry.view.details.dataset.outcome;
  keepFocus(entry, entry.view.details.querySelector("summary"));
  tick();
}

// What a person reads for a decision. `errorCode`: the call's result's, once known (it tells a
// timeout from a denial that gave "timed out" as its reason, and a stopped turn).
function outcomeOf({ approved, reason }, errorCode) {
  const said = (words) => (reason ? `${words}: ${reason}` : words);
  if (approved) return ["approved", said("approved")];
  if (errorCode === "cancelled") return ["cancelled", "not decided: the answer was stopped"];
  if (errorCode === "approval_timeout" || (!errorCode && reason === "timed out")) return ["timeout", "timed out"];
  return ["denied", said("denied")];
}

function showOutcome(entry, kind, text) {
  endWaiting(entry);
  entry.outcome.dataset.outcome = kind;
  entry.outcome.textContent = text;
  entry.outcome.hidden = false;
}

/** `tool_approval_result`: the decision, from this tab or another; the result follows. */
export function decided(view, { approved, reason }) {
  const entry = entryOf(view);
  entry.decision = { approved, reason: reason ?? null };
  showOutcome(entry, ...outcomeOf(entry.decision));
  const result = view.details.dataset.outcome;
  if (result === "ok" || result === "error") return; // the result came first: its status stays
  view.status.textContent = approved ? "approved · running…" : entry.outcome.textContent;
}

/** A stored call that needed approval (`"approval": "required"`): its result says what was decided. */
export function markRequired(view) {
  view.approvalRequired = true;
}

// Without the decision itself (a live result, or one stored without it): what its error says.
function decisionFromError(error) {
  if (!error) return { approved: true, reason: null };
  const known = { tool_denied: null, approval_timeout: "timed out", cancelled: "cancelled" };
  return error.code in known ? { approved: false, reason: known[error.code] } : null;
}

/** The call's result is shown: with its decision (stored with it, told before, or read from its error). */
export function settleWithResult(view, { error, approval }) {
  if (!view.approval && !view.approvalRequired && !approval) return;
  const decision = approval ?? view.approval?.decision ?? decisionFromError(error);
  if (!decision) {
    if (view.approval) endWaiting(view.approval);
    return;
  }
  const entry = entryOf(view);
  entry.decision = decision;
  showOutcome(entry, ...outcomeOf(decision, error?.code ?? null));
  if (decision.approved) view.status.textContent = `approved · ${view.status.textContent}`;
}

function noLongerWaiting(entry, text) {
  showOutcome(entry, "unknown", text);
  entry.view.status.textContent = text;
}

/** After a (re)join: calls shown waiting that `active_turn.pending_approvals` no longer lists. */
export function stopWaitingExcept(callIds) {
  for (const entry of Array.from(waiting)) {
    if (!callIds.has(entry.view.callId)) noLongerWaiting(entry, "decided while this tab was away");
  }
}

/** The turn ended: none of its calls waits any more. */
export function endWaitingIn(article) {
  for (const entry of Array.from(waiting)) {
    if (article.contains(entry.view.details)) noLongerWaiting(entry, "no longer waiting");
  }
}

/** Another session is about to be shown. */
export function clearApprovals() {
  waiting.clear();
  tick();
}
