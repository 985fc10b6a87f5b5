// Courier's browser client: pub/sub over the broker's WebSocket JSON gateway.
// The wire protocol is crates/web/PROTOCOL.md; this module is served by the
// broker at /courier.js. No dependencies, no build step: it runs as an ES
// module in browsers and in Node >= 20 (Node 20 needs --experimental-websocket,
// or pass a WebSocket class through the `WebSocket` option).

/** Error kinds that retrying can help with (PROTOCOL.md). */
const RETRYABLE = new Set(["Unavailable", "Busy", "TimedOut"]);

/** Ids of operations wrap back to 1 past this, so they stay small integers. */
export const MAX_ID = 0x7fffffff;

/** Defaults of {@link connect}'s options. */
export const DEFAULTS = Object.freeze({
  /** Milliseconds for the handshake, for each answer, and a request's default. */
  timeout: 5000,
  /** Reconnect after a dropped connection (never after a refusal: close 1008). */
  reconnect: true,
  /** First reconnect delay (ms); doubles each attempt, with jitter. */
  reconnectDelay: 100,
  /** Ceiling of the reconnect delay (ms). */
  maxReconnectDelay: 5000,
  /** Attempts after one drop before giving up (`Infinity`: never give up). */
  maxReconnectAttempts: Infinity,
  /** Operations awaiting the broker's answer; past it, new ones fail `Busy`. */
  maxInFlight: 1024,
  /** Live subscriptions; past it `subscribe` throws `LimitExceeded` (the broker's own default is 256). */
  maxSubscriptions: 1024,
  /** Unread messages a subscription buffers; past it the oldest are dropped. */
  maxPending: 1024,
  /** Milliseconds between keep-alive pings (0: none). A missed pong drops the connection. */
  pingInterval: 30000,
});

/** How long (ms) a socket's `error` waits for the `close` that should follow. */
const ERROR_GRACE = 1000;

/** The broker's ceiling for a request's `timeout_ms` (PROTOCOL.md). */
const MAX_REQUEST_TIMEOUT = 60000;

/**
 * How many times its UTF-8 size a text payload's JSON escaping may take
 * before it travels as `data64` instead. The broker's frame limit is twice
 * the payload limit plus 64 KiB (PROTOCOL.md), so text within `max_payload`
 * whose escaping at most doubles it always fits; past that, base64 (4/3 of
 * the bytes) is both smaller and safe.
 */
const MAX_ESCAPE_GROWTH = 2;

/** Marks an operation's `TimedOut` of our own timer: the broker may still act on it. */
const UNANSWERED = Symbol("courier.unanswered");

/** Marks a handshake failure that a retry cannot change (close 1008). */
const FINAL = Symbol("courier.final");

/**
 * Every failure this module reports. `kind` is one of PROTOCOL.md's kinds:
 * `Unavailable`, `Busy`, `TimedOut`, `Refused`, `NotFound`, `InvalidInput`,
 * `LimitExceeded`, `Conflict`, `Unsupported`, `Internal`.
 */
export class CourierError extends Error {
  /**
   * @param {string} kind the error kind
   * @param {string} message what happened
   * @param {{sid?: string}} [extra] the subscription it concerns, if any
   */
  constructor(kind, message, extra = {}) {
    super(`${kind}: ${message}`);
    this.name = "CourierError";
    /** @type {string} */
    this.kind = kind;
    /** @type {boolean} whether trying again later can succeed */
    this.retryable = RETRYABLE.has(kind);
    /** @type {string | undefined} */
    this.sid = extra.sid;
  }
}

// ---------------------------------------------------------------- payloads

const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_INDEX = new Map([...B64].map((c, i) => [c, i]));
const utf8Encoder = new TextEncoder();
// ignoreBOM keeps a leading U+FEFF in the text, as the broker's `data` keeps it.
const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/**
 * Standard base64 (with padding) of `bytes`. Browser-safe: no Buffer, no btoa.
 * @param {Uint8Array} bytes
 * @returns {string}
 */
export function toBase64(bytes) {
  let out = "";
  let i = 0;
  for (; i + 2 < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
    out += B64[n >> 18] + B64[(n >> 12) & 63] + B64[(n >> 6) & 63] + B64[n & 63];
  }
  if (i < bytes.length) {
    const n = (bytes[i] << 16) | ((bytes[i + 1] ?? 0) << 8);
    out += B64[n >> 18] + B64[(n >> 12) & 63];
    out += i + 1 < bytes.length ? B64[(n >> 6) & 63] + "=" : "==";
  }
  return out;
}

/**
 * The bytes of standard base64 `text` (padding optional).
 * @param {string} text
 * @returns {Uint8Array}
 * @throws {CourierError} `InvalidInput` if `text` is not base64
 */
export function fromBase64(text) {
  const s = text.replace(/=+$/, "");
  if (s.length % 4 === 1) throw new CourierError("InvalidInput", "bad base64 length");
  const out = new Uint8Array(Math.floor((s.length * 3) / 4));
  let acc = 0;
  let bits = 0;
  let o = 0;
  for (const c of s) {
    const v = B64_INDEX.get(c);
    if (v === undefined) throw new CourierError("InvalidInput", "bad base64 character");
    acc = ((acc << 6) | v) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (acc >> bits) & 0xff;
    }
  }
  return out;
}

/**
 * The frame fields for a payload and its size in bytes: bytes (Uint8Array,
 * any ArrayBuffer view, ArrayBuffer) travel as `data64`; a string as `data`,
 * unless JSON would escape it to more than {@link MAX_ESCAPE_GROWTH} times
 * its UTF-8 size (control characters take 6 bytes each) or it is not
 * well-formed UTF-16 (the broker's JSON parser refuses a lone surrogate's
 * escape): then as `data64` of its UTF-8, lone surrogates becoming U+FFFD as
 * `WebSocket.send` would make them. Anything else travels as its JSON text
 * (`undefined` is the empty payload). Either way subscribers get the same
 * bytes, and text again if they are UTF-8.
 * @returns {{size: number, fields: () => {data?: string, data64?: string}}}
 *   the fields are made on demand, so that a payload over the limit is never copied
 */
function encodePayload(payload) {
  if (payload === undefined) return { size: 0, fields: () => ({ data: "" }) };
  let bytes = null;
  if (payload instanceof Uint8Array) bytes = payload;
  else if (ArrayBuffer.isView(payload)) {
    bytes = new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  } else if (payload instanceof ArrayBuffer) bytes = new Uint8Array(payload);
  if (bytes) return { size: bytes.length, fields: () => ({ data64: toBase64(bytes) }) };
  const text = typeof payload === "string" ? payload : JSON.stringify(payload);
  if (typeof text !== "string") throw new CourierError("InvalidInput", "payload has no JSON form");
  const { size, escaped, wellFormed } = measureText(text);
  if (wellFormed && escaped <= size * MAX_ESCAPE_GROWTH) return { size, fields: () => ({ data: text }) };
  return { size, fields: () => ({ data64: toBase64(utf8Encoder.encode(text)) }) };
}

/**
 * A string's UTF-8 size (a lone surrogate counts as U+FFFD's 3 bytes), the
 * size of its JSON string escaping without the quotes (as JSON.stringify
 * writes it), and whether it has no lone surrogates. One pass, no copy.
 * @param {string} text
 * @returns {{size: number, escaped: number, wellFormed: boolean}}
 */
function measureText(text) {
  let size = 0;
  let escaped = 0;
  let wellFormed = true;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) {
      size += 1;
      // `"` `\` and \b \t \n \f \r take 2 bytes; other controls \u00XX, 6.
      if (c === 0x22 || c === 0x5c || c === 0x08 || c === 0x09 || c === 0x0a || c === 0x0c || c === 0x0d) escaped += 2;
      else escaped += c < 0x20 ? 6 : 1;
    } else if (c < 0x800) {
      size += 2;
      escaped += 2;
    } else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length && (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      size += 4; // a surrogate pair: one 4-byte character
      escaped += 4;
      i++;
    } else if (c >= 0xd800 && c <= 0xdfff) {
      size += 3; // a lone surrogate: U+FFFD in UTF-8, \udXXX in JSON
      escaped += 6;
      wellFormed = false;
    } else {
      size += 3;
      escaped += 3;
    }
  }
  return { size, escaped, wellFormed };
}

// ---------------------------------------------------------------- messages

/** A message from a subscription, or a request's reply. */
export class Message {
  #conn;
  #bytes;

  /** @internal built by the connection from a `msg` or `reply` frame */
  constructor(conn, frame) {
    this.#conn = conn;
    /** @type {string | undefined} the subject it was published to (a reply's may be absent) */
    this.subject = frame.subject;
    /** @type {string | undefined} where the publisher wants an answer */
    this.reply = frame.reply;
    /** @type {Record<string, string>} its headers (empty if none) */
    this.headers = frame.headers ?? {};
    /**
     * The payload as text, or null if it is not UTF-8. A broker may send
     * text as `data64` (when JSON escaping would bloat it): still text here.
     * @type {string | null}
     */
    this.data = typeof frame.data === "string" ? frame.data : "";
    if (typeof frame.data64 === "string" && typeof frame.data !== "string") {
      this.#bytes = fromBase64(frame.data64);
      this.data = utf8OrNull(this.#bytes);
    }
  }

  /** @returns {Uint8Array} the payload's bytes (UTF-8 for a text payload) */
  get bytes() {
    this.#bytes ??= utf8Encoder.encode(this.data ?? "");
    return this.#bytes;
  }

  /** @returns {any} the payload parsed as JSON (throws SyntaxError if it is not; TypeError if not UTF-8) */
  json() {
    return JSON.parse(this.data ?? utf8Decoder.decode(this.bytes));
  }

  /**
   * Publishes `payload` to the message's reply subject.
   * @param {any} payload as for {@link Connection#publish}
   * @param {{headers?: Record<string, string>}} [options]
   * @returns {Promise<void>}
   */
  respond(payload, options = {}) {
    if (!this.reply) {
      return Promise.reject(new CourierError("InvalidInput", "the message asks for no reply"));
    }
    return this.#conn.publish(this.reply, payload, { headers: options.headers });
  }
}

// ----------------------------------------------------------- subscriptions

/**
 * Messages for one subject filter. Read them with `onMessage` or with
 * `for await (const m of sub)`. Without a handler, unread messages wait in a
 * buffer of `maxPending`; past it the oldest are dropped and counted in
 * `dropped`. Leaving a `for await` loop early unsubscribes.
 */
export class Subscription {
  #conn;
  #buffer = [];
  #waiters = [];
  #end = null; // {error} once ended
  #ready;
  #settleReady;
  #onMessage = null;

  /** @internal made by {@link Connection#subscribe} */
  constructor(conn, sid, subject, queue, maxPending) {
    this.#conn = conn;
    /** @type {string} the connection-unique id the broker knows it by */
    this.sid = sid;
    /** @type {string} its subject filter */
    this.subject = subject;
    /** @type {string | undefined} its queue group */
    this.queue = queue;
    /** @type {number} the buffer's bound */
    this.maxPending = maxPending;
    /** @type {number} messages dropped because the buffer was full */
    this.dropped = 0;
    /** @type {((e: CourierError) => void) | null} the broker's notices (e.g. `Busy` when it dropped messages) and handler errors */
    this.onError = null;
    this.#ready = new Promise((resolve, reject) => (this.#settleReady = { resolve, reject }));
    this.#ready.catch(() => {}); // its failure also ends the iteration: never an unhandled rejection
  }

  /** @returns {((m: Message) => void) | null} the handler that takes every message, if set */
  get onMessage() {
    return this.#onMessage;
  }

  /** Sets the handler; messages buffered until now are handed to it first. */
  set onMessage(handler) {
    this.#onMessage = handler ?? null;
    while (this.#onMessage && this.#buffer.length > 0) this.#handle(this.#buffer.shift());
  }

  /** @returns {Promise<void>} settles when the broker first accepts (or refuses) the subscription */
  get ready() {
    return this.#ready;
  }

  /** @returns {boolean} whether it still receives messages */
  get active() {
    return this.#end === null;
  }

  /**
   * Stops delivery at once (messages already buffered can still be read).
   * @returns {Promise<void>} settles when the broker confirms (at once if disconnected)
   */
  unsubscribe() {
    if (!this.active) return Promise.resolve();
    this._end(null);
    return this.#conn._unsubscribe(this);
  }

  /** @internal the connection settles `ready` */
  _settleReady(error) {
    if (error) this.#settleReady.reject(error);
    else this.#settleReady.resolve();
  }

  /** @internal a message arrived */
  _deliver(message) {
    if (!this.active) return;
    if (this.#onMessage) return this.#handle(message);
    const waiter = this.#waiters.shift();
    if (waiter) return waiter.resolve({ value: message, done: false });
    if (this.#buffer.length >= this.maxPending) {
      this.#buffer.shift();
      this.dropped++;
    }
    this.#buffer.push(message);
  }

  #handle(message) {
    try {
      this.#onMessage(message);
    } catch (e) {
      // The page's bug must not stop delivery to the other subscriptions.
      this._notify(new CourierError("Internal", `onMessage threw: ${e}`, { sid: this.sid }));
    }
  }

  /** @internal an error notice that does not end the subscription */
  _notify(error) {
    if (this.onError) this.onError(error);
    else this.#conn._notify(error);
  }

  /** @internal ends delivery; `error` is thrown by the iterator after the buffer drains */
  _end(error) {
    if (!this.active) return;
    this.#end = { error };
    this.#conn._forget(this);
    for (const w of this.#waiters.splice(0)) {
      if (error) w.reject(error);
      else w.resolve({ value: undefined, done: true });
    }
    // Unsubscribed before the broker answered: nothing left to wait for.
    this._settleReady(error);
  }

  /** @returns {AsyncIterator<Message>} */
  [Symbol.asyncIterator]() {
    return {
      next: () => {
        if (this.#buffer.length > 0) return Promise.resolve({ value: this.#buffer.shift(), done: false });
        if (this.#end) {
          const error = this.#end.error;
          this.#end.error = null; // thrown once, then plain done
          return error ? Promise.reject(error) : Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
      },
      return: async () => {
        await this.unsubscribe().catch(() => {});
        return { value: undefined, done: true };
      },
    };
  }
}

// -------------------------------------------------------------- connection

/**
 * Connects to a broker's WebSocket listener.
 * @param {string} url `ws://host:port/` or `wss://host:port/`
 * @param {object} [options]
 * @param {string} [options.token] proves an identity (sent in `connect`, never in the URL)
 * @param {string} [options.name] this client's name in the broker's logs
 * @param {number} [options.timeout] ms for the handshake, each answer and a request's default (5000)
 * @param {boolean} [options.reconnect] reconnect after a drop (true)
 * @param {number} [options.reconnectDelay] first reconnect delay in ms (100)
 * @param {number} [options.maxReconnectDelay] reconnect delay ceiling in ms (5000)
 * @param {number} [options.maxReconnectAttempts] attempts per drop before closing (Infinity)
 * @param {number} [options.maxInFlight] operations awaiting an answer (1024)
 * @param {number} [options.maxSubscriptions] live subscriptions on the connection (1024)
 * @param {number} [options.maxPending] a subscription's default buffer bound (1024)
 * @param {number} [options.pingInterval] keep-alive ping period in ms, 0 for none (30000)
 * @param {(status: string, error?: CourierError) => void} [options.onStatus] `connected`, `reconnecting`, `closed`
 * @param {(error: CourierError) => void} [options.onError] errors that belong to no operation
 * @param {typeof WebSocket} [options.WebSocket] the WebSocket class (default: the global)
 * @returns {Promise<Connection>} once the broker answered `connected`
 * @throws {CourierError} `Refused` on a wrong token, `Unavailable`, `TimedOut`
 */
export async function connect(url, options = {}) {
  const conn = new Connection(url, options);
  await conn._open();
  return conn;
}

/** A connection to a broker; made by {@link connect}. */
export class Connection {
  #url;
  #opts;
  #WS;
  #ws = null;
  #status = "connecting";
  #pending = new Map(); // id -> {op, resolve, reject, timer}
  #subs = new Map(); // sid -> Subscription
  #nextId = 1;
  #nextSid = 1;
  #attempt = 0;
  #retryTimer = null;
  #pingTimer = null;
  #graceTimer = null; // a connected socket's `error` waiting for its `close`
  #cancelHandshake = null; // fails the handshake under way, if any
  #closedResolve;

  /** @internal use {@link connect} */
  constructor(url, options) {
    this.#url = url;
    // An option given as `undefined` keeps its default.
    this.#opts = { ...DEFAULTS };
    for (const [k, v] of Object.entries(options)) if (v !== undefined) this.#opts[k] = v;
    this.#WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WS !== "function") {
      throw new CourierError("Unsupported", "no WebSocket class (on Node 20, run with --experimental-websocket)");
    }
    /** @type {((status: string, error?: CourierError) => void) | null} */
    this.onStatus = options.onStatus ?? null;
    /** @type {((error: CourierError) => void) | null} */
    this.onError = options.onError ?? null;
    /** @type {string | null} the broker's version, e.g. `courier 0.1.0` */
    this.server = null;
    /** @type {string | null} the identity the token proved (null: anonymous) */
    this.identity = null;
    /** @type {number} the largest payload the broker takes, in bytes */
    this.maxPayload = Infinity;
    /** @type {Promise<CourierError | null>} resolves once closed for good: null after close(), else why */
    this.closed = new Promise((resolve) => (this.#closedResolve = resolve));
  }

  /** @returns {"connecting" | "connected" | "reconnecting" | "closed"} */
  get status() {
    return this.#status;
  }

  /**
   * Subscribes to `subject` (a filter: `*` one token, `>` the rest).
   * @param {string} subject
   * @param {{queue?: string, maxPending?: number}} [options] a queue group shares the messages among its members
   * @returns {Subscription} at once; `sub.ready` tells when the broker took it
   * @throws {CourierError} `Unavailable` once the connection is closed,
   *   `LimitExceeded` past `maxSubscriptions`
   */
  subscribe(subject, options = {}) {
    if (this.#status === "closed") throw new CourierError("Unavailable", "connection closed");
    // Also bounds what a reconnect sends at once (re-subscribing is not held to maxInFlight).
    if (this.#subs.size >= this.#opts.maxSubscriptions) {
      throw new CourierError("LimitExceeded", `${this.#opts.maxSubscriptions} subscriptions already live`);
    }
    let sid;
    do {
      sid = `s${this.#nextSid}`;
      this.#nextSid = this.#nextSid >= MAX_ID ? 1 : this.#nextSid + 1;
    } while (this.#subs.has(sid));
    const sub = new Subscription(this, sid, subject, options.queue, options.maxPending ?? this.#opts.maxPending);
    this.#subs.set(sid, sub);
    // While reconnecting it is sent with the others once connected.
    if (this.#status === "connected") this.#sendSub(sub);
    return sub;
  }

  /**
   * Publishes `payload` to `subject`: a string as text, bytes as binary,
   * anything else as JSON text.
   * @param {string} subject
   * @param {string | Uint8Array | ArrayBuffer | any} payload
   * @param {{headers?: Record<string, string>, reply?: string}} [options]
   * @returns {Promise<void>} resolves on the broker's `ok` (delivered to every live subscription)
   */
  publish(subject, payload, options = {}) {
    return this.#op("pub", { subject, reply: options.reply, headers: options.headers }, { payload });
  }

  /**
   * Sends a request and waits for its reply.
   * @param {string} subject
   * @param {any} payload as for {@link Connection#publish}
   * @param {{headers?: Record<string, string>, timeout?: number}} [options] timeout in ms (at most 60000)
   * @returns {Promise<Message>} the reply
   * @throws {CourierError} `TimedOut` when nobody answered in time
   */
  request(subject, payload, options = {}) {
    const wanted = options.timeout ?? this.#opts.timeout;
    if (typeof wanted !== "number" || Number.isNaN(wanted)) {
      return Promise.reject(new CourierError("InvalidInput", `timeout: a number of ms, not ${wanted}`));
    }
    // The broker takes whole milliseconds only: round up, never time out early.
    const timeout = Math.min(Math.max(1, Math.ceil(wanted)), MAX_REQUEST_TIMEOUT);
    return this.#op("req", { subject, headers: options.headers, timeout_ms: timeout }, { payload, timeout });
  }

  /** @returns {Promise<void>} resolves on the broker's `pong` */
  ping() {
    return this.#op("ping", {});
  }

  /**
   * Closes the connection for good; pending operations fail `Unavailable`.
   * @returns {Promise<void>} once the socket is closed (or after `timeout`)
   */
  async close() {
    if (this.#status === "closed") return;
    // Only an open socket is worth waiting for: a failed attempt's may never
    // report its close (Node 20).
    const ws = this.#status === "connected" ? this.#ws : null;
    this.#shutdown(null); // detaches and closes the socket
    if (!ws || ws.readyState === 3) return;
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, this.#opts.timeout);
      ws.onclose = ws.onerror = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  // ---- internals

  /** @internal the first connection; rejects instead of reconnecting */
  async _open() {
    try {
      await this.#handshake();
    } catch (error) {
      this.#shutdown(error);
      throw error;
    }
  }

  /** Opens a socket, sends `connect`, waits for `connected`. */
  #handshake() {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this.#WS(this.#url);
      } catch (e) {
        return reject(new CourierError("InvalidInput", `cannot open ${this.#url}: ${e.message ?? e}`));
      }
      this.#ws = ws;
      let done = false;
      let opened = false;
      let refusal = null; // the broker's `error`, whose close code comes next
      let grace = null;
      const fail = (error) => {
        if (done) return;
        done = true;
        this.#cancelHandshake = null;
        clearTimeout(timer);
        clearTimeout(grace);
        detach(ws);
        reject(error);
      };
      // close() during the attempt: end it now rather than at its timeout,
      // whose timer would keep Node running.
      this.#cancelHandshake = () => fail(new CourierError("Unavailable", "connection closed"));
      const timer = setTimeout(() => fail(refusal ?? new CourierError("TimedOut", "no answer to connect")), this.#opts.timeout);
      /** Fails soon unless the close, which carries the code, comes first. */
      const failSoon = (error) => {
        clearTimeout(grace);
        grace = setTimeout(() => fail(error), ERROR_GRACE);
      };
      ws.onopen = () => {
        opened = true;
        const hello = { op: "connect" };
        if (this.#opts.token !== undefined) hello.token = this.#opts.token;
        if (this.#opts.name !== undefined) hello.name = this.#opts.name;
        ws.send(JSON.stringify(hello));
      };
      // Node 20's WebSocket reports a refused connection with `error` alone,
      // never `close`: a socket that never opened fails at once. One that
      // opened waits a moment for its `close`, whose code tells a policy
      // refusal (1008) from a drop.
      ws.onerror = () => {
        const error = refusal ?? new CourierError("Unavailable", `cannot connect to ${this.#url}`);
        if (opened) failSoon(error);
        else fail(error);
      };
      ws.onclose = (ev) => {
        const why = `connection closed (${ev.code ?? "no code"}${ev.reason ? `: ${ev.reason}` : ""})`;
        const error = refusal ?? new CourierError(ev.code === 1008 ? "Refused" : "Unavailable", why);
        // 1008 is the broker's policy close (a wrong token, a bad first
        // frame, no connect in time): a retry would meet the same answer.
        if (ev.code === 1008) error[FINAL] = true;
        fail(error);
      };
      ws.onmessage = (ev) => {
        const frame = parseFrame(ev.data);
        if (!frame || done) return;
        if (frame.op === "error") {
          // Its close follows (1008: final; 1013, too many connections: retry).
          refusal = new CourierError(frame.kind ?? "Internal", frame.message ?? "");
          return failSoon(refusal);
        }
        if (frame.op !== "connected") return;
        done = true;
        this.#cancelHandshake = null;
        clearTimeout(timer);
        clearTimeout(grace);
        this.server = frame.server ?? null;
        this.identity = frame.identity ?? null;
        this.maxPayload = Number.isFinite(frame.max_payload) ? frame.max_payload : Infinity;
        ws.onmessage = (e) => this.#onFrame(ws, e.data);
        ws.onclose = (e) => this.#onDrop(ws, e);
        // `close`, which follows `error`, carries the code (1008 matters);
        // the error alone counts only if no close comes soon.
        ws.onerror = () => {
          clearTimeout(this.#graceTimer);
          this.#graceTimer = setTimeout(() => this.#onDrop(ws, { code: 1006, reason: "socket error" }), ERROR_GRACE);
        };
        this.#attempt = 0;
        this.#setStatus("connected");
        // Every live subscription again, past maxInFlight if need be (at
        // most maxSubscriptions of them): they were the broker's before the
        // drop, and failing them Busy would end them for no fault of theirs.
        for (const sub of this.#subs.values()) this.#sendSub(sub, { bounded: false });
        this.#armPing();
        resolve();
      };
    });
  }

  /**
   * Sends an operation that the broker answers, if fewer than `maxInFlight`
   * await theirs. `bounded: false` (only re-subscribing and unsubscribing:
   * refusing them would leave the broker delivering to nobody) raises that
   * bound by `maxSubscriptions`, which is as many as a reconnect sends.
   */
  #op(op, fields, { payload, timeout = this.#opts.timeout, bounded = true } = {}) {
    if (this.#status !== "connected") {
      return Promise.reject(new CourierError("Unavailable", `not connected (${this.#status})`));
    }
    const limit = this.#opts.maxInFlight + (bounded ? 0 : this.#opts.maxSubscriptions);
    if (this.#pending.size >= limit) {
      return Promise.reject(new CourierError("Busy", `${limit} operations already await an answer`));
    }
    const frame = { op, ...fields };
    if (op === "pub" || op === "req") {
      let encoded;
      try {
        encoded = encodePayload(payload);
      } catch (e) {
        // JSON.stringify throws on a BigInt or a cycle.
        return Promise.reject(e instanceof CourierError ? e : new CourierError("InvalidInput", `payload has no JSON form: ${e.message ?? e}`));
      }
      if (encoded.size > this.maxPayload) {
        return Promise.reject(new CourierError("LimitExceeded", `payload of ${encoded.size} bytes, the broker takes ${this.maxPayload}`));
      }
      Object.assign(frame, encoded.fields());
    }
    const id = this.#allocId();
    frame.id = id;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        const error = new CourierError("TimedOut", `no answer to ${op} within ${timeout} ms`);
        error[UNANSWERED] = true;
        reject(error);
      }, timeout);
      this.#pending.set(id, { op, resolve, reject, timer });
      try {
        // JSON.stringify drops undefined fields, so optional ones vanish.
        this.#ws.send(JSON.stringify(frame));
      } catch (e) {
        this.#pending.delete(id);
        clearTimeout(timer);
        reject(new CourierError("Unavailable", `cannot send: ${e.message ?? e}`));
      }
    });
  }

  #allocId() {
    let id;
    do {
      id = this.#nextId;
      this.#nextId = this.#nextId >= MAX_ID ? 1 : this.#nextId + 1;
    } while (this.#pending.has(id));
    return id;
  }

  #sendSub(sub, { bounded = true } = {}) {
    const fields = { sid: sub.sid, subject: sub.subject, queue: sub.queue };
    const ws = this.#ws;
    this.#op("sub", fields, { bounded }).then(
      () => sub._settleReady(null),
      (error) => {
        // A drop is healed by the reconnect, which sends it again.
        if (error.kind === "Unavailable" && this.#status !== "closed") return;
        // Refused, InvalidInput, LimitExceeded, Conflict, TimedOut, Busy:
        // the subscription ends.
        sub._end(error);
        // No answer in time: the broker may take it after all, and would
        // then deliver to nobody for the rest of the connection. Its answers
        // come in order, so an `unsub` now ends it (or is `ok` for a sid it
        // never had). A refusal from the broker took nothing: no `unsub`.
        if (error[UNANSWERED] && ws === this.#ws) this.#sendUnsub(sub.sid).catch(() => {});
      },
    );
  }

  /** Sends `unsub` for `sid`, past maxInFlight: a subscription left on the broker would leak. */
  #sendUnsub(sid) {
    return this.#op("unsub", { sid }, { bounded: false });
  }

  /** @internal forgets a subscription that ended */
  _forget(sub) {
    if (this.#subs.get(sub.sid) === sub) this.#subs.delete(sub.sid);
  }

  /** @internal tells the broker a subscription ended */
  _unsubscribe(sub) {
    if (this.#status !== "connected") return Promise.resolve();
    return this.#sendUnsub(sub.sid).catch((error) => {
      if (error.kind !== "Unavailable") throw error;
    });
  }

  /** @internal an error that belongs to no operation: to `onError`, else the console */
  _notify(error) {
    if (this.onError) this.onError(error);
    else globalThis.console?.error("courier:", error);
  }

  #onFrame(ws, data) {
    if (ws !== this.#ws) return;
    const frame = parseFrame(data);
    if (!frame) return this._notify(new CourierError("Internal", "the broker sent a frame that is not a JSON object"));
    switch (frame.op) {
      case "msg": {
        const sub = this.#subs.get(frame.sid);
        if (!sub) return; // unsubscribed while it was on its way
        const message = decode(this, frame);
        return message instanceof CourierError ? sub._notify(message) : sub._deliver(message);
      }
      case "ok":
        return this.#take(frame.id)?.resolve();
      case "pong":
        // A pong without an id (an older broker) answers the oldest ping.
        return this.#take(frame.id ?? firstPing(this.#pending))?.resolve();
      case "reply": {
        const p = this.#take(frame.id);
        if (!p) return; // answers a request that already timed out
        const message = decode(this, frame);
        return message instanceof CourierError ? p.reject(message) : p.resolve(message);
      }
      case "error": {
        const error = new CourierError(frame.kind ?? "Internal", frame.message ?? "", { sid: frame.sid });
        if (frame.id !== undefined) return this.#take(frame.id)?.reject(error); // else: it timed out already
        const sub = frame.sid !== undefined ? this.#subs.get(frame.sid) : undefined;
        return sub ? sub._notify(error) : this._notify(error);
      }
      default:
        return; // a newer broker's op: ignored, as the protocol asks of both sides
    }
  }

  /** Removes and returns the pending operation `id`, if there is one. */
  #take(id) {
    const p = id === undefined ? undefined : this.#pending.get(id);
    if (!p) return undefined;
    this.#pending.delete(id);
    clearTimeout(p.timer);
    return p;
  }

  #armPing() {
    clearTimeout(this.#pingTimer);
    if (!(this.#opts.pingInterval > 0)) return;
    this.#pingTimer = setTimeout(() => {
      const ws = this.#ws;
      this.ping().then(
        () => this.#armPing(),
        (error) => {
          if (ws !== this.#ws || this.#status !== "connected") return; // dropped meanwhile
          if (error.kind !== "TimedOut") return this.#armPing(); // e.g. Busy: try next period
          // A missed pong means a dead link the socket may not notice for
          // minutes: give it up now rather than wait for its close event.
          this.#onDrop(ws, { code: 4000, reason: "no pong" });
        },
      );
    }, this.#opts.pingInterval);
  }

  #onDrop(ws, ev) {
    if (ws !== this.#ws || this.#status !== "connected") return;
    detach(ws); // `error` and `close` may both come: handle the drop once
    clearTimeout(this.#pingTimer);
    clearTimeout(this.#graceTimer);
    const why = new CourierError("Unavailable", `connection lost (${ev.code ?? "no code"}${ev.reason ? `: ${ev.reason}` : ""})`);
    this.#failPending(why);
    // 1008 is the broker's policy close: a refusal that a retry cannot change.
    if (!this.#opts.reconnect || ev.code === 1008) return this.#shutdown(ev.code === 1008 ? new CourierError("Refused", why.message) : why);
    this.#setStatus("reconnecting", why);
    this.#scheduleRetry();
  }

  #scheduleRetry() {
    if (this.#attempt >= this.#opts.maxReconnectAttempts) {
      return this.#shutdown(new CourierError("Unavailable", `gave up after ${this.#attempt} reconnect attempts`));
    }
    const ceiling = Math.min(this.#opts.maxReconnectDelay, this.#opts.reconnectDelay * 2 ** Math.min(this.#attempt, 30));
    // Half fixed, half random: spread out clients dropped at the same moment.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.#attempt++;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#handshake().catch((error) => {
        if (this.#status === "closed") return;
        // A refusal, or any policy close (1008), would be the same next time.
        if (error.kind === "Refused" || error[FINAL]) return this.#shutdown(error);
        this.#scheduleRetry();
      });
    }, delay);
  }

  #failPending(error) {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(error);
    }
  }

  #shutdown(error) {
    if (this.#status === "closed") return;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#pingTimer);
    clearTimeout(this.#graceTimer);
    this.#status = "closed";
    this.#cancelHandshake?.(); // an attempt under way: its socket and timer go now
    this.#failPending(new CourierError("Unavailable", "connection closed"));
    for (const sub of [...this.#subs.values()]) sub._end(error);
    if (this.#ws) detach(this.#ws);
    this.#emitStatus("closed", error ?? undefined);
    this.#closedResolve(error);
  }

  #setStatus(status, error) {
    this.#status = status;
    this.#emitStatus(status, error);
  }

  #emitStatus(status, error) {
    try {
      this.onStatus?.(status, error);
    } catch (e) {
      this._notify(new CourierError("Internal", `onStatus threw: ${e}`));
    }
  }
}

/** The text that `bytes` are in UTF-8, or null if they are not UTF-8. */
function utf8OrNull(bytes) {
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    return null;
  }
}

/** The message in a `msg` or `reply` frame, or the error that it is malformed. */
function decode(conn, frame) {
  try {
    return new Message(conn, frame);
  } catch (e) {
    return e instanceof CourierError ? e : new CourierError("Internal", `bad ${frame.op} frame: ${e}`);
  }
}

/** Silences a socket the connection is done with, and closes it. */
function detach(ws) {
  ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  try {
    if (ws.readyState < 2) ws.close(1000);
  } catch {
    // Already failing: nothing left to close.
  }
}

/** A frame's JSON object, or null if it is not one. */
function parseFrame(data) {
  if (typeof data !== "string") return null;
  try {
    const v = JSON.parse(data);
    return v !== null && typeof v === "object" && !Array.isArray(v) && typeof v.op === "string" ? v : null;
  } catch {
    return null;
  }
}

/** The oldest pending ping's id, for a pong without an id. */
function firstPing(pending) {
  for (const [id, p] of pending) if (p.op === "ping") return id;
  return undefined;
}
