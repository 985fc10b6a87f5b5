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
  const { broker, c, statuses } = await fakeConnect({ pingInterval: 20, timeout: 50 });
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
