// A scripted stand-in for the WebSocket class, injected through connect()'s
// `WebSocket` option, so that the module's own logic (handshake, timeouts,
// reconnects, bounds) is tested without a network and without a broker.

/**
 * A fake broker: `FakeBroker.WebSocket` is the class to inject. Each socket
 * the module opens is recorded in `sockets`; every frame it sends goes to
 * `onFrame(frame, socket)`, which answers with `socket.receive(obj)`.
 */
export class FakeBroker {
  constructor() {
    /** @type {FakeSocket[]} */
    this.sockets = [];
    /** Frames sent by the client, in order, across sockets. */
    this.frames = [];
    /** Whether new sockets open (false: they fail as a refused TCP connect would). */
    this.accepting = true;
    /** A refused socket fires `error` alone, never `close`, as Node 20's does. */
    this.errorOnlyRefusals = false;
    /** Answers `connect` with `connected` when true. */
    this.answerConnect = true;
    /** If set, answers `connect` instead: `(frame, socket) => void`. */
    this.onConnect = null;
    /** Answers `sub`, `unsub`, `pub` with `ok` and `ping` with `pong` when true. */
    this.answerOps = true;
    /** Called for every frame the default answers do not cover. */
    this.onFrame = () => {};
    const broker = this;
    this.WebSocket = class extends FakeSocket {
      constructor(url) {
        super(url, broker);
      }
    };
  }

  /** The newest socket. */
  get socket() {
    return this.sockets[this.sockets.length - 1];
  }

  /** Frames of one op sent so far. */
  sent(op) {
    return this.frames.filter((f) => f.op === op);
  }

  handle(frame, socket) {
    this.frames.push(frame);
    if (frame.op === "connect") {
      if (this.onConnect) return this.onConnect(frame, socket);
      if (this.answerConnect) socket.receive({ op: "connected", server: "fake 0", identity: frame.token ? "alice" : null, max_payload: 1000 });
      return;
    }
    if (this.answerOps && ["sub", "unsub", "pub"].includes(frame.op)) return socket.receive({ op: "ok", id: frame.id });
    if (this.answerOps && frame.op === "ping") return socket.receive({ op: "pong", id: frame.id });
    this.onFrame(frame, socket);
  }
}

class FakeSocket {
  constructor(url, broker) {
    this.url = url;
    this.broker = broker;
    this.readyState = 0;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    broker.sockets.push(this);
    setTimeout(() => {
      if (this.readyState !== 0) return;
      if (!broker.accepting && broker.errorOnlyRefusals) return this.onerror?.({});
      if (!broker.accepting) return this.drop(1006);
      this.readyState = 1;
      this.onopen?.({});
    }, 0);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    const frame = JSON.parse(text);
    // Answer asynchronously, as a real socket would.
    setTimeout(() => this.broker.handle(frame, this), 0);
  }

  close(code = 1005, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    setTimeout(() => this.drop(code, reason), 0);
  }

  /** The broker side ends the connection with `code`. */
  drop(code, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onerror?.({});
    this.onclose?.({ code, reason });
  }

  /** The broker sends `obj` as a text frame (or `raw` text as is). */
  receive(obj, raw) {
    if (this.readyState !== 1) return;
    this.onmessage?.({ data: raw ?? JSON.stringify(obj) });
  }
}

/** Resolves after `ms` milliseconds. */
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Waits until `cond()` holds, polling; fails after `ms`. */
export async function until(cond, ms = 3000, what = "condition") {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}
