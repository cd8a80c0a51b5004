// Who the page is, and the service's HTTP routes (docs/protocol.md, HTTP and Conversations).
// With authentication on, the token (kept in this tab only) says who; off, a random anonymous
// user id this browser keeps in its local storage.
const TOKEN_KEY = "playground.token";
const USER_KEY = "playground.user_id";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

// crypto.randomUUID needs a secure context; the page may be opened over plain http on a LAN address.
export function randomHex(bytes) {
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// Created only when needed: with a token the page writes nothing to local storage.
export function anonymousUserId() {
  let id = localStorage.getItem(USER_KEY);
  if (!id) {
    id = `anon-${randomHex(16)}`;
    localStorage.setItem(USER_KEY, id);
  }
  return id;
}

/** What a request says about its user: nothing with a token (the header says it), else `user_id`. */
export function anonymousOwner() {
  return token.get() ? {} : { user_id: anonymousUserId() };
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** A request to the service's own HTTP API: its JSON answer (null for 204), or an ApiError. */
export async function api(path, { method = "GET", query = {}, body } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query)) if (value !== null && value !== undefined) url.searchParams.set(name, value);
  const headers = {};
  const bearer = token.get();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "unreachable", "the service could not be reached");
  }
  if (response.status === 204) return null;
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = answer?.detail ?? {};
    throw new ApiError(response.status, detail.code ?? `http_${response.status}`, detail.message ?? response.statusText);
  }
  return answer;
}

export const sessionPath = (sessionId) => `/api/sessions/${encodeURIComponent(sessionId)}`;
