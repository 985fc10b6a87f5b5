// The module's own logic against a fake WebSocket (test/fake.mjs): no broker
// needed, so these run everywhere, with or without COURIER_WS_URL.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, CourierError, toBase64, fromBase64, MAX_ID } from "../courier.js";
import { FakeBroker, sleep, until } from "./fake.mjs";

/** connect() against a fresh fake broker, with test-friendly timings. */
async function fakeConnect(options = {}) {
  const broker = new FakeBroker();
  Object.assign(broker, options.broker ?? {});
  const statuses = [];
  const c = await connect("ws://fake/", {
    WebSocket: broker.WebSocket,
    timeout: 500,
    reconnectDelay: 10,
    maxReconnectDelay: 40,
    pingInterval: 0,
    onStatus: (s) => statuses.push(s),
    ...options,
  });
  return { broker, c, statuses };
}

async function rejectsKind(promise, kind) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof CourierError, `not a CourierError: ${e}`);
    assert.equal(e.kind, kind, e.message);
    return true;
  });
}

test("base64 round-trips every length and byte, and agrees with Node's", () => {
  for (let n = 0; n < 70; n++) {
    const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 97 + n * 31) & 0xff);
    const text = toBase64(bytes);
    assert.equal(text, Buffer.from(bytes).toString("base64"));
    assert.deepEqual(fromBase64(text), bytes);
  }
  const all = Uint8Array.from({ length: 256 }, (_, i) => i);
  assert.deepEqual(fromBase64(toBase64(all)), all);
  assert.throws(() => fromBase64("ab!d"), (e) => e.kind === "InvalidInput");
  assert.throws(() => fromBase64("abcde"), (e) => e.kind === "InvalidInput");
});

test("connect sends token and name first, and learns the broker's limits", async () => {
  const { broker, c, statuses } = await fakeConnect({ token: "secret", name: "page" });
  assert.deepEqual(broker.frames[0], { op: "connect", token: "secret", name: "page" });
  assert.equal(c.identity, "alice");
  assert.equal(c.server, "fake 0");
  assert.equal(c.maxPayload, 1000);
  assert.equal(c.status, "connected");
  assert.deepEqual(statuses, ["connected"]);
  await c.close();
  assert.equal(await c.closed, null);
  assert.deepEqual(statuses, ["connected", "closed"]);
});

test("a refused token rejects connect with Refused, not retryable, and no reconnect", async () => {
  const broker = new FakeBroker();
  broker.answerConnect = false;
  broker.onFrame = () => {};
  const orig = broker.handle.bind(broker);
  broker.handle = (frame, socket) => {
    orig(frame, socket);
    if (frame.op === "connect") {
      socket.receive({ op: "error", kind: "Refused", message: "bad token" });
      socket.drop(1008);
    }
  };
  await rejectsKind(connect("ws://fake/", { WebSocket: broker.WebSocket, token: "x", reconnectDelay: 1 }), "Refused");
  await sleep(30);
  assert.equal(broker.sockets.length, 1);
  const e = new CourierError("Refused", "x");
  assert.equal(e.retryable, false);
  assert.equal(new CourierError("TimedOut", "x").retryable, true);
});

test("a broker that never says connected times the handshake out", async () => {
  const broker = new FakeBroker();
  broker.answerConnect = false;
  await rejectsKind(connect("ws://fake/", { WebSocket: broker.WebSocket, timeout: 50 }), "TimedOut");
  assert.equal(broker.socket.readyState >= 2, true, "socket left open");
});

test("an unreachable broker rejects connect with Unavailable, also when the socket only says error", async () => {
  for (const errorOnlyRefusals of [false, true]) {
    const broker = new FakeBroker();
    Object.assign(broker, { accepting: false, errorOnlyRefusals });
    const started = Date.now();
    const err = await connect("ws://fake/", { WebSocket: broker.WebSocket, timeout: 2000 }).catch((e) => e);
    assert.equal(err.kind, "Unavailable", err.message);
    assert.equal(err.retryable, true);
    assert.ok(Date.now() - started < 1500, "waited for the handshake timeout instead");
  }
});

test("a request the broker never answers rejects with TimedOut at its timeout", async () => {
  const errors = [];
  const { broker, c } = await fakeConnect({ onError: (e) => errors.push(e) });
  const started = Date.now();
  await rejectsKind(c.request("svc.none", "hi", { timeout: 60 }), "TimedOut");
  assert.ok(Date.now() - started >= 55);
  const [req] = broker.sent("req");
  assert.equal(req.timeout_ms, 60);
  assert.equal(req.data, "hi");
  // The broker's own late answer to the expired id is ignored.
  broker.socket.receive({ op: "error", id: req.id, kind: "TimedOut", message: "late" });
  broker.socket.receive({ op: "reply", id: req.id, subject: "r", data: "late" });
  assert.deepEqual(errors, []);
  // The broker's ceiling is 60 s: longer timeouts are clamped, not refused.
  c.request("svc.none", "x", { timeout: 120000 }).catch(() => {});
  await until(() => broker.sent("req").length === 2);
  assert.equal(broker.sent("req")[1].timeout_ms, 60000);
  await c.close();
});

test("payloads: text as data, bytes as data64, other values as JSON; replies decode both", async () => {
  const { broker, c } = await fakeConnect();
  broker.onFrame = (f, s) => s.receive({ op: "reply", id: f.id, subject: "r", data64: toBase64(Uint8Array.of(0, 255)), headers: { a: "b" } });
  await c.publish("a", "text");
  await c.publish("a", Uint8Array.of(1, 2, 3));
  await c.publish("a", { n: 1 });
  await c.publish("a", new Uint16Array([1]).buffer);
  const pubs = broker.sent("pub");
  assert.equal(pubs[0].data, "text");
  assert.equal(pubs[1].data64, "AQID");
  assert.equal(pubs[1].data, undefined);
  assert.equal(pubs[2].data, '{"n":1}');
  assert.equal(pubs[3].data64, "AQA=");
  const r = await c.request("svc", "q", { headers: { x: "y" } });
  assert.equal(r.data, null);
  assert.deepEqual(r.bytes, Uint8Array.of(0, 255));
  assert.deepEqual(r.headers, { a: "b" });
  assert.deepEqual(broker.sent("req")[0].headers, { x: "y" });
  await c.close();
});

test("a payload over the broker's max_payload fails LimitExceeded without being sent", async () => {
  const { broker, c } = await fakeConnect();
  await rejectsKind(c.publish("a", "x".repeat(1001)), "LimitExceeded");
  await rejectsKind(c.publish("a", new Uint8Array(1001)), "LimitExceeded");
  await rejectsKind(c.publish("a", "é".repeat(501)), "LimitExceeded"); // 1002 UTF-8 bytes
  await c.publish("a", "é".repeat(500));
  assert.equal(broker.sent("pub").length, 1);
  await c.close();
});

test("operations awaiting an answer are bounded by maxInFlight", async () => {
  const { broker, c } = await fakeConnect({ maxInFlight: 3 });
  broker.answerOps = false;
  const held = [1, 2, 3].map((i) => rejectsKind(c.publish("a", `${i}`), "Unavailable"));
  await rejectsKind(c.publish("a", "x"), "Busy");
  await c.close();
  await Promise.all(held);
});

test("ids stay integers below MAX_ID", async () => {
  const { broker, c } = await fakeConnect();
  await c.publish("a", "x");
  await c.publish("a", "y");
  const ids = broker.sent("pub").map((f) => f.id);
  assert.ok(ids.every((id) => Number.isInteger(id) && id > 0 && id <= MAX_ID));
  assert.notEqual(ids[0], ids[1]);
  await c.close();
});

test("the iterator's buffer keeps the newest maxPending messages and counts the dropped", async () => {
  const { broker, c } = await fakeConnect();
  const sub = c.subscribe("t.>", { maxPending: 3 });
  await sub.ready;
  const { sid } = broker.sent("sub")[0];
  for (let i = 0; i < 10; i++) broker.socket.receive({ op: "msg", sid, subject: `t.${i}`, data: `${i}` });
  assert.equal(sub.dropped, 7);
  const got = [];
  for await (const m of sub) {
    got.push(m.data);
    if (got.length === 3) break; // leaving the loop unsubscribes
  }
  assert.deepEqual(got, ["7", "8", "9"]);
  assert.equal(sub.active, false);
  await until(() => broker.sent("unsub").length === 1);
  assert.equal(broker.sent("unsub")[0].sid, sid);
  await c.close();
});

test("onMessage takes messages instead of the buffer; a throwing handler is reported", async () => {
  const errors = [];
  const { broker, c } = await fakeConnect({ onError: (e) => errors.push(e) });
  const sub = c.subscribe("t");
  const got = [];
  sub.onMessage = (m) => {
    got.push(m.json());
    throw new Error("page bug");
  };
  await sub.ready;
  const { sid } = broker.sent("sub")[0];
  broker.socket.receive({ op: "msg", sid, subject: "t", data: '{"a":1}', reply: "_r.1" });
  broker.socket.receive({ op: "msg", sid: "unknown", subject: "t", data: "x" });
  assert.deepEqual(got, [{ a: 1 }]);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].sid, sid);
  await c.close();
});

test("setting onMessage hands it the messages buffered so far, then the rest", async () => {
  const { broker, c } = await fakeConnect();
  const sub = c.subscribe("t");
  await sub.ready;
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data: "early" });
  const got = [];
  sub.onMessage = (m) => got.push(m.data);
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data: "late" });
  assert.deepEqual(got, ["early", "late"]);
  await c.close();
});

test("a refused subscription ends: ready rejects and the iterator throws Refused", async () => {
  const { broker, c } = await fakeConnect();
  broker.answerOps = false;
  broker.onFrame = (f, s) => {
    if (f.op === "sub") s.receive({ op: "error", id: f.id, sid: f.sid, kind: "Refused", message: "no" });
  };
  const sub = c.subscribe("secret.>");
  await rejectsKind(sub.ready, "Refused");
  await rejectsKind(sub[Symbol.asyncIterator]().next(), "Refused");
  assert.equal(sub.active, false);
  await c.close();
});

test("a broker's notice for a subscription (slow consumer) goes to its onError", async () => {
  const { broker, c } = await fakeConnect();
  const sub = c.subscribe("t");
  const notices = [];
  sub.onError = (e) => notices.push(e);
  await sub.ready;
  broker.socket.receive({ op: "error", sid: sub.sid, kind: "Busy", message: "dropped 5" });
  assert.equal(notices.length, 1);
  assert.equal(notices[0].kind, "Busy");
  assert.equal(sub.active, true);
  await c.close();
});

test("frames the module cannot read are reported, unknown ops ignored", async () => {
  const errors = [];
  const { broker, c } = await fakeConnect({ onError: (e) => errors.push(e) });
  broker.socket.receive(null, "not json");
  broker.socket.receive({ op: "future-op" });
  broker.socket.receive({ op: "reply", id: 99, subject: "x", data64: "!!" }); // no such request
  broker.socket.receive({ op: "error", kind: "InvalidInput", message: "no id" });
  assert.deepEqual(errors.map((e) => e.kind), ["Internal", "InvalidInput"]);
  // A malformed reply fails its request; a malformed msg is its subscription's notice.
  broker.onFrame = (f, s) => s.receive({ op: "reply", id: f.id, subject: "x", data64: "!!" });
  await rejectsKind(c.request("svc", "x"), "InvalidInput");
  const sub = c.subscribe("t");
  await sub.ready;
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data64: "!!" });
  assert.equal(errors.length, 3);
  assert.equal(errors[2].kind, "InvalidInput");
  await c.ping();
  await c.close();
});

test("a drop fails pending operations Unavailable, reconnects and re-subscribes", async () => {
  const { broker, c, statuses } = await fakeConnect({ token: "t" });
  const sub = c.subscribe("orders.>", { queue: "workers" });
  await sub.ready;
  broker.answerOps = false;
  const pending = c.request("svc", "x", { timeout: 5000 });
  await until(() => broker.sent("req").length === 1);
  broker.answerOps = true;
  broker.accepting = false; // the first reconnect attempts fail, Node 20's way
  broker.errorOnlyRefusals = true;
  broker.socket.drop(1001);
  await rejectsKind(pending, "Unavailable");
  assert.equal(c.status, "reconnecting");
  await rejectsKind(c.publish("a", "x"), "Unavailable"); // never buffered
  const sub2 = c.subscribe("late"); // sent once connected again
  await until(() => broker.sockets.length >= 3, 3000, "reconnect attempts");
  broker.accepting = true;
  await until(() => c.status === "connected", 3000, "reconnected");
  await sub2.ready;
  const connects = broker.sent("connect");
  assert.equal(connects.length, 2);
  assert.equal(connects[1].token, "t");
  const subs = broker.sent("sub").map((f) => [f.sid, f.subject, f.queue]);
  assert.equal(subs.length, 3);
  assert.deepEqual(subs[0], [sub.sid, "orders.>", "workers"]);
  // After the reconnect every live subscription is sent again, with its sid.
  assert.deepEqual(subs.slice(1).sort(), [
    [sub.sid, "orders.>", "workers"],
    [sub2.sid, "late", undefined],
  ].sort());
  // Messages flow on the new socket.
  const it = sub[Symbol.asyncIterator]();
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "orders.eu", data: "again" });
  assert.equal((await it.next()).value.data, "again");
  await c.publish("a", "x");
  assert.deepEqual(statuses, ["connected", "reconnecting", "connected"]);
  await c.close();
});

test("a policy close (1008) after connecting ends the connection with Refused", async () => {
  const { broker, c, statuses } = await fakeConnect();
  const sub = c.subscribe("t");
  await sub.ready;
  broker.socket.drop(1008);
  const why = await c.closed;
  assert.equal(why.kind, "Refused");
  assert.equal(broker.sockets.length, 1);
  assert.deepEqual(statuses, ["connected", "closed"]);
  assert.equal(sub.active, false);
  assert.throws(() => c.subscribe("t"), (e) => e.kind === "Unavailable");
});

test("reconnect: false, and maxReconnectAttempts, end in closed with Unavailable", async () => {
  const one = await fakeConnect({ reconnect: false });
  one.broker.socket.drop(1001);
  assert.equal((await one.c.closed).kind, "Unavailable");
  assert.equal(one.broker.sockets.length, 1);

  const two = await fakeConnect({ maxReconnectAttempts: 2 });
  two.broker.accepting = false;
  two.broker.errorOnlyRefusals = true;
  two.broker.socket.drop(1006);
  assert.equal((await two.c.closed).kind, "Unavailable");
  assert.equal(two.broker.sockets.length, 3);
  assert.deepEqual(two.statuses, ["connected", "reconnecting", "closed"]);
});

test("a missed pong gives the socket up and reconnects", async () => {
  const { broker, c, statuses } = await fakeConnect({ pingInterval: 20, timeout: 250 });
  await until(() => broker.sent("ping").length >= 2, 3000, "pings answered"); // answered pings re-arm
  broker.answerOps = false; // pongs stop
  await until(() => statuses.includes("reconnecting"), 3000, "reconnecting");
  broker.answerOps = true;
  await until(() => c.status === "connected" && broker.sockets.length === 2, 3000, "reconnected");
  await c.close();
});

test("close() rejects pending operations, ends subscriptions and closes the socket", async () => {
  const { broker, c } = await fakeConnect();
  const sub = c.subscribe("t");
  await sub.ready;
  broker.answerOps = false;
  const p = rejectsKind(c.publish("t", "x"), "Unavailable");
  const next = sub[Symbol.asyncIterator]().next();
  await c.close();
  await p;
  assert.deepEqual(await next, { value: undefined, done: true });
  assert.equal(broker.socket.readyState, 3);
  assert.equal(c.status, "closed");
  await c.close(); // twice is fine
  await rejectsKind(c.publish("t", "x"), "Unavailable");
});

test("respond without a reply subject fails InvalidInput", async () => {
  const { broker, c } = await fakeConnect();
  const sub = c.subscribe("t");
  await sub.ready;
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data: "x" });
  const { value: m } = await sub[Symbol.asyncIterator]().next();
  assert.equal(m.reply, undefined);
  await rejectsKind(m.respond("y"), "InvalidInput");
  await c.close();
});

// ------------------------------------------------ review findings, one each

/**
 * Wraps the global setTimeout/clearTimeout to see which timers are still
 * armed (the module looks them up on the global at each call).
 */
function trackTimers() {
  const live = new Map(); // handle -> delay
  const { setTimeout: set, clearTimeout: clear } = globalThis;
  globalThis.setTimeout = (fn, ms, ...args) => {
    const handle = set(() => {
      live.delete(handle);
      fn(...args);
    }, ms);
    live.set(handle, ms);
    return handle;
  };
  globalThis.clearTimeout = (handle) => {
    live.delete(handle);
    clear(handle);
  };
  return {
    armed: (ms) => [...live.values()].filter((d) => d === ms).length,
    restore() {
      globalThis.setTimeout = set;
      globalThis.clearTimeout = clear;
    },
  };
}

/** `promise`'s value, or a failure naming `what` after `ms`. */
async function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A short, printable form of a test string. */
const show = (text) => JSON.stringify(text.length > 40 ? `${text.slice(0, 40)}…(${text.length})` : text);

test("a subscription the broker does not confirm in time ends TimedOut and is unsubscribed, also after a reconnect", async () => {
  const errors = [];
  const { broker, c } = await fakeConnect({ timeout: 200, onError: (e) => errors.push(e) });
  broker.answerOps = false; // the broker is slow: no ok in time
  const sub = c.subscribe("slow.>");
  await rejectsKind(sub.ready, "TimedOut");
  assert.equal(sub.active, false);
  await until(() => broker.sent("unsub").length === 1, 3000, "unsub after the timeout");
  assert.equal(broker.sent("unsub")[0].sid, sub.sid);
  // The broker's late ok and messages for it go nowhere.
  const [subFrame] = broker.sent("sub");
  broker.socket.receive({ op: "ok", id: subFrame.id });
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "slow.x", data: "late" });

  // A broker that refuses takes nothing: no unsub.
  broker.onFrame = (f, s) => {
    if (f.op === "sub") s.receive({ op: "error", id: f.id, sid: f.sid, kind: "Refused", message: "no" });
  };
  await rejectsKind(c.subscribe("secret").ready, "Refused");
  await sleep(20);
  assert.equal(broker.sent("unsub").length, 1);

  // Re-subscribing after a reconnect: one that times out is unsubscribed too.
  broker.onFrame = () => {};
  broker.answerOps = true;
  const kept = c.subscribe("kept");
  await kept.ready;
  broker.answerOps = false;
  broker.answerConnect = true;
  broker.socket.drop(1001);
  await until(() => c.status === "connected" && broker.sockets.length === 2, 3000, "reconnected");
  await until(() => broker.sent("unsub").length === 2, 3000, "unsub after the re-subscription's timeout");
  assert.equal(broker.sent("unsub")[1].sid, kept.sid);
  assert.equal(kept.active, false);
  assert.deepEqual(errors, []);
  await c.close();
});

test("late answers to operations that timed out are reported nowhere, other errors still are", async () => {
  const errors = [];
  const { broker, c } = await fakeConnect({ timeout: 200, onError: (e) => errors.push(e) });
  broker.answerOps = false;
  const sub = c.subscribe("t");
  sub.onError = (e) => errors.push(e);
  await rejectsKind(sub.ready, "TimedOut");
  await rejectsKind(c.request("svc", "x", { timeout: 20 }), "TimedOut");
  await rejectsKind(c.publish("a", "x"), "TimedOut");
  await rejectsKind(c.ping(), "TimedOut");
  for (const f of broker.frames.filter((f) => f.id !== undefined)) {
    // What a broker answers once its own timeout passes, or late.
    broker.socket.receive({ op: "error", id: f.id, kind: "TimedOut", message: "late", sid: f.sid });
    broker.socket.receive({ op: f.op === "ping" ? "pong" : f.op === "req" ? "reply" : "ok", id: f.id, subject: "r", data: "late" });
  }
  assert.deepEqual(errors, []);
  // An error that belongs to no operation is still the page's to see.
  broker.socket.receive({ op: "error", kind: "Busy", message: "notice" });
  assert.deepEqual(errors.map((e) => e.kind), ["Busy"]);
  await c.close();
});

test("text that JSON would escape to more than twice its bytes travels as data64 of its UTF-8, sized in bytes", async () => {
  const { broker, c } = await fakeConnect(); // max_payload 1000
  const samples = [
    "plain",
    '{"a":"b","c":[1,2]}', // quotes: JSON text stays text
    "line\nbreaks\tand\ttabs",
    "\u0001".repeat(900), // 900 bytes, 5400 escaped: under the payload limit, over the frame's
    "a\u0000b\u0002c\u001fd",
    "é".repeat(300) + "\u0003".repeat(10),
    "😀".repeat(250), // 1000 bytes
    "lone \ud800 surrogate",
    "\udc00",
  ];
  // And random mixes of ASCII, controls, quotes, 2/3/4-byte characters and lone surrogates.
  const alphabet = ["a", "\u0001", "\u0007", '"', "\\", "\n", "é", "€", "😀", "\ud800", "\udfff", "\u2028", "\u007f"];
  for (let n = 0; n < 200; n++) {
    let s = "";
    const len = (n * 37) % 120;
    for (let i = 0; i < len; i++) s += alphabet[(n * 7 + i * i * 13 + i) % alphabet.length];
    samples.push(s);
  }
  for (const text of samples) {
    const bytes = Buffer.from(text, "utf8"); // lone surrogates become U+FFFD, as TextEncoder makes them
    await c.publish("a", text);
    const f = broker.sent("pub").at(-1);
    if (f.data !== undefined) {
      assert.equal(f.data, text);
      const escaped = Buffer.byteLength(JSON.stringify(text)) - 2;
      assert.ok(escaped <= 2 * bytes.length, `${show(text)} sent as text`);
      assert.equal(text.isWellFormed?.() ?? true, true, `${show(text)} is not well-formed`);
    } else {
      assert.deepEqual(Buffer.from(f.data64, "base64"), bytes, show(text));
      const escaped = Buffer.byteLength(JSON.stringify(text)) - 2;
      assert.ok(escaped > 2 * bytes.length || !(text.isWellFormed?.() ?? true), `${show(text)} sent as data64`);
    }
  }
  assert.ok(broker.sent("pub")[3].data64, "900 control characters as data64");
  assert.equal(broker.sent("pub")[1].data, '{"a":"b","c":[1,2]}');
  // The limit counts UTF-8 bytes, whichever the encoding.
  await rejectsKind(c.publish("a", "\u0001".repeat(1001)), "LimitExceeded");
  await rejectsKind(c.publish("a", "😀".repeat(250) + "x"), "LimitExceeded");
  await rejectsKind(c.publish("a", "\ud800".repeat(334)), "LimitExceeded"); // 1002 bytes of U+FFFD
  await rejectsKind(c.publish("a", { n: 1n }), "InvalidInput"); // a BigInt has no JSON form
  await c.close();
});

test("a payload that comes as data64 is still text if it is UTF-8; a reply may have no subject", async () => {
  const { broker, c } = await fakeConnect();
  const sub = c.subscribe("t");
  await sub.ready;
  const utf8 = (t) => toBase64(new TextEncoder().encode(t));
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data64: utf8("\u0001é{}") });
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data64: utf8('{"a":1}') });
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data64: "gA==" }); // 0x80: not UTF-8
  broker.socket.receive({ op: "msg", sid: sub.sid, subject: "t", data64: utf8("\ufeffbom") });
  const [text, json, bin, bom] = await Promise.all([0, 1, 2, 3].map(() => sub[Symbol.asyncIterator]().next())).then((r) => r.map((x) => x.value));
  assert.equal(bom.data, "\ufeffbom", "a leading BOM is kept, as in the bytes");
  assert.equal(text.data, "\u0001é{}");
  assert.deepEqual(json.json(), { a: 1 });
  assert.equal(bin.data, null);
  assert.deepEqual(bin.bytes, Uint8Array.of(0x80));
  broker.onFrame = (f, s) => s.receive({ op: "reply", id: f.id, data: "no subject" });
  const r = await c.request("svc", "x");
  assert.equal(r.data, "no subject");
  assert.equal(r.subject, undefined);
  await c.close();
});

test("a fractional request timeout is sent rounded up, a NaN one refused", async () => {
  const { broker, c } = await fakeConnect();
  c.request("svc", "x", { timeout: 10.2 }).catch(() => {});
  c.request("svc", "x", { timeout: 0.3 }).catch(() => {});
  await until(() => broker.sent("req").length === 2);
  assert.deepEqual(broker.sent("req").map((f) => f.timeout_ms), [11, 1]);
  await rejectsKind(c.request("svc", "x", { timeout: NaN }), "InvalidInput");
  await rejectsKind(c.request("svc", "x", { timeout: "1000" }), "InvalidInput");
  assert.equal(broker.sent("req").length, 2);
  await c.close();
});

test("close() during a reconnect attempt ends it and leaves no timer armed", async () => {
  const timers = trackTimers();
  let c;
  try {
    const timeout = 4321; // tells the handshake's timer from the others
    const made = await fakeConnect({ timeout });
    c = made.c;
    const { broker, statuses } = made;
    broker.answerConnect = false; // the next handshake hangs
    broker.socket.drop(1001);
    await until(() => broker.sent("connect").length === 2, 3000, "the reconnect's connect");
    assert.equal(c.status, "reconnecting");
    assert.ok(timers.armed(timeout) >= 1, "the handshake's timer");
    await c.close();
    await sleep(20);
    assert.equal(timers.armed(timeout), 0, "a timer of the attempt still runs");
    assert.equal(broker.socket.readyState, 3);
    assert.deepEqual(statuses, ["connected", "reconnecting", "closed"]);
    assert.equal(await within(c.closed, 3000, "closed"), null);
    assert.equal(broker.sockets.length, 2);
  } finally {
    timers.restore();
    await c?.close(); // a failure must not leave it reconnecting for ever
  }
});

test("re-subscribing after a reconnect, and unsubscribing, are not held to maxInFlight", async () => {
  const { broker, c } = await fakeConnect({ maxInFlight: 2 });
  const subs = [];
  for (let i = 0; i < 5; i++) {
    const sub = c.subscribe(`t.${i}`);
    await sub.ready;
    subs.push(sub);
  }
  broker.socket.drop(1001);
  await until(() => c.status === "connected" && broker.sent("sub").length === 10, 3000, "five re-subscriptions");
  await c.ping(); // answered after the subs' oks
  assert.deepEqual(subs.map((s) => s.active), [true, true, true, true, true]);
  // At the limit, new operations fail Busy, but unsubscribe still reaches the broker.
  broker.answerOps = false;
  const held = [c.publish("a", "1"), c.publish("a", "2")].map((p) => rejectsKind(p, "Unavailable"));
  await rejectsKind(c.publish("a", "3"), "Busy");
  subs[0].unsubscribe().catch(() => {});
  await until(() => broker.sent("unsub").length === 1, 3000, "unsub past the limit");
  assert.equal(broker.sent("unsub")[0].sid, subs[0].sid);
  await c.close();
  await Promise.all(held);
});

test("live subscriptions are bounded by maxSubscriptions, also while reconnecting", async () => {
  const { broker, c } = await fakeConnect({ maxSubscriptions: 3 });
  try {
    const subs = [c.subscribe("a"), c.subscribe("b")];
    broker.accepting = false;
    broker.socket.drop(1001);
    subs.push(c.subscribe("c")); // waits for the reconnect
    assert.throws(() => c.subscribe("d"), (e) => e.kind === "LimitExceeded");
    await subs[0].unsubscribe(); // frees a place at once, while disconnected
    subs.push(c.subscribe("d"));
    broker.accepting = true;
    await until(() => c.status === "connected", 3000, "reconnected");
    await Promise.all(subs.slice(1).map((s) => s.ready));
    assert.deepEqual(broker.sent("sub").slice(2).map((f) => f.subject).sort(), ["b", "c", "d"]);
  } finally {
    await c.close(); // a failure must not leave it reconnecting for ever
  }
});

test("a policy close (1008) of a reconnect's handshake stops reconnecting; a 1013 does not", async () => {
  // InvalidInput, then 1008: the broker's policy, which a retry would meet again.
  const { broker, c, statuses } = await fakeConnect();
  broker.onConnect = (f, s) => {
    s.receive({ op: "error", kind: "InvalidInput", message: "bad connect" });
    s.drop(1008);
  };
  broker.socket.drop(1001);
  // A failure here must not leave it reconnecting for ever.
  const why = await within(c.closed, 3000, "closed after InvalidInput and 1008").finally(() => c.close());
  assert.equal(why.kind, "InvalidInput");
  assert.equal(broker.sockets.length, 2);
  assert.deepEqual(statuses, ["connected", "reconnecting", "closed"]);

  // A 1008 without an error frame first ends it too, as Refused.
  const two = await fakeConnect();
  two.broker.onConnect = (f, s) => s.drop(1008);
  two.broker.socket.drop(1001);
  assert.equal((await within(two.c.closed, 3000, "closed after 1008").finally(() => two.c.close())).kind, "Refused");
  assert.equal(two.broker.sockets.length, 2);

  // Busy, then 1013 (too many connections): try again later, and get in.
  const three = await fakeConnect();
  let busy = 2;
  three.broker.onConnect = (f, s) => {
    if (busy-- > 0) {
      s.receive({ op: "error", kind: "Busy", message: "too many connections" });
      return s.drop(1013);
    }
    s.receive({ op: "connected", server: "fake 0", identity: null, max_payload: 1000 });
  };
  three.broker.socket.drop(1001);
  await until(() => three.c.status === "connected" && three.broker.sockets.length === 4, 3000, "in after two Busy");
  await three.c.close();
});
