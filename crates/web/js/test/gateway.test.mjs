// The module against a real gateway. crates/web/tests/node.rs starts one
// and sets:
//   COURIER_WS_URL         an open gateway, with `svc.echo` answered on the Rust
//                          side (the payload back, ASCII letters uppercased)
//   COURIER_WS_DROP_URL    the same gateway behind a proxy that cuts every
//                          connection when something is published to `test.drop`
//   COURIER_WS_TOKEN_URL   a gateway requiring a token, COURIER_TOKEN proving
//                          "alice", who may do anything but touch `forbidden.>`
// A test whose variable is unset is skipped.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { connect, CourierError } from "../courier.js";

const URL_OPEN = process.env.COURIER_WS_URL;
const URL_DROP = process.env.COURIER_WS_DROP_URL;
const URL_TOKEN = process.env.COURIER_WS_TOKEN_URL;
const TOKEN = process.env.COURIER_TOKEN;

const open = { skip: !URL_OPEN && "COURIER_WS_URL not set" };

/** Every wait in these tests is bounded. */
const WAIT = 5000;

function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The subscription's next `n` messages, within WAIT. */
async function take(sub, n, what = sub.subject) {
  const it = sub[Symbol.asyncIterator]();
  const got = [];
  while (got.length < n) {
    const { value, done } = await within(it.next(), WAIT, `${what} (${got.length}/${n})`);
    if (done) throw new Error(`${what}: subscription ended`);
    got.push(value);
  }
  return got;
}

async function rejectsKind(promise, kind) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof CourierError, `not a CourierError: ${e}`);
    assert.equal(e.kind, kind, e.message);
    return true;
  });
}

/** A unique subject prefix per test, so tests never see each other's messages. */
let n = 0;
const fresh = (name) => `${name}.${process.pid}.${++n}`;

/** Runs `fn` with connections opened on `url`, closing them afterwards. */
async function withConns(url, count, fn, options = {}) {
  const conns = [];
  try {
    for (let i = 0; i < count; i++) conns.push(await connect(url, { name: `node test ${i}`, ...options }));
    return await fn(...conns);
  } finally {
    await Promise.all(conns.map((c) => c.close()));
  }
}

test("connect: an anonymous client learns the broker and its payload limit", open, () =>
  withConns(URL_OPEN, 1, async (c) => {
    assert.equal(c.status, "connected");
    assert.equal(c.identity, null);
    assert.equal(typeof c.server, "string");
    assert.ok(c.maxPayload > 0 && Number.isFinite(c.maxPayload));
    await c.ping();
  }));

test("the listener serves this very module at /courier.js", open, async () => {
  const http = URL_OPEN.replace(/^ws/, "http").replace(/\/?$/, "/courier.js");
  const res = await within(fetch(http), WAIT, "GET /courier.js");
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /javascript/);
  const mine = await readFile(new URL("../courier.js", import.meta.url), "utf8");
  assert.equal(await res.text(), mine);
});

test("publish reaches wildcard subscriptions on another connection, with headers", open, () =>
  withConns(URL_OPEN, 2, async (a, b) => {
    const p = fresh("orders");
    const one = b.subscribe(`${p}.*.new`);
    const rest = b.subscribe(`${p}.>`);
    await Promise.all([one.ready, rest.ready]);
    await a.publish(`${p}.eu.new`, "first", { headers: { "x-origin": "node" } });
    await a.publish(`${p}.us.paid.late`, { n: 2 });
    const [m] = await take(one, 1);
    assert.equal(m.subject, `${p}.eu.new`);
    assert.equal(m.data, "first");
    assert.equal(m.headers["x-origin"], "node");
    const both = await take(rest, 2);
    assert.deepEqual(both.map((x) => x.subject), [`${p}.eu.new`, `${p}.us.paid.late`]);
    assert.deepEqual(both[1].json(), { n: 2 });
  }));

test("a queue group shares messages among its members; a plain subscription sees all", open, () =>
  withConns(URL_OPEN, 3, async (pub, w1, w2) => {
    const s = fresh("jobs");
    const total = 20;
    const counts = [0, 0];
    const got = [];
    let allIn;
    const done = new Promise((resolve) => (allIn = resolve));
    const members = [w1, w2].map((w, i) => {
      const m = w.subscribe(s, { queue: "workers" });
      m.onMessage = (msg) => {
        counts[i]++;
        got.push(msg.data);
        if (got.length === total) allIn();
      };
      return m;
    });
    const all = pub.subscribe(s);
    await Promise.all([...members.map((m) => m.ready), all.ready]);
    for (let i = 0; i < total; i++) await pub.publish(s, `${i}`);
    const seen = (await take(all, total)).map((m) => m.data);
    assert.deepEqual(seen, [...Array(total).keys()].map(String));
    await within(done, WAIT, "the group's messages");
    assert.equal(new Set(got).size, total, "a message reached two members");
    assert.ok(counts[0] > 0 && counts[1] > 0, `one member got everything: ${counts}`);
  }));

test("request-reply with a responder that is another connection of this module", open, () =>
  withConns(URL_OPEN, 2, async (client, server) => {
    const s = fresh("js.upper");
    const svc = server.subscribe(s, { queue: "upper" });
    svc.onMessage = (m) => {
      m.respond(m.data.toUpperCase(), { headers: { "x-served-by": "js" } }).catch(() => {});
    };
    await svc.ready;
    const r = await client.request(s, "hi there", { timeout: WAIT });
    assert.equal(r.data, "HI THERE");
    assert.equal(r.headers["x-served-by"], "js");
    // Several at once, each matched to its own reply.
    const words = ["a", "bb", "ccc", "dddd"];
    const replies = await Promise.all(words.map((w) => client.request(s, w, { timeout: WAIT })));
    assert.deepEqual(replies.map((m) => m.data), words.map((w) => w.toUpperCase()));
  }));

test("request-reply with a Rust responder on the bus (svc.echo), text and binary", open, () =>
  withConns(URL_OPEN, 1, async (c) => {
    const r = await c.request("svc.echo", "hello from node", { timeout: WAIT });
    assert.equal(r.data, "HELLO FROM NODE");
    const bin = Uint8Array.of(0, 0xff, 0x61, 0xfe, 0x7a);
    const rb = await c.request("svc.echo", bin, { timeout: WAIT });
    assert.equal(rb.data, null, "not UTF-8, so it comes back as data64");
    assert.deepEqual(rb.bytes, Uint8Array.of(0, 0xff, 0x41, 0xfe, 0x5a));
  }));

test("a request nobody answers in time rejects with TimedOut", open, () =>
  withConns(URL_OPEN, 2, async (client, mute) => {
    // No subscriber at all.
    await rejectsKind(client.request(fresh("nobody.home"), "x", { timeout: 300 }), "TimedOut");
    // A subscriber that never answers.
    const s = fresh("silent");
    const sub = mute.subscribe(s);
    await sub.ready;
    const started = Date.now();
    await rejectsKind(client.request(s, "x", { timeout: 300 }), "TimedOut");
    assert.ok(Date.now() - started >= 250, "timed out early");
    assert.equal((await take(sub, 1))[0].data, "x");
    // The connection is still good.
    await client.ping();
  }));

test("binary payloads round-trip byte for byte; UTF-8 bytes arrive as text", open, () =>
  withConns(URL_OPEN, 1, async (c) => {
    const s = fresh("bin");
    const sub = c.subscribe(s);
    await sub.ready;
    const all = Uint8Array.from({ length: 256 }, (_, i) => i);
    await c.publish(s, all);
    await c.publish(s, new TextEncoder().encode("plain é"));
    await c.publish(s, new Uint8Array(0));
    const [bin, text, empty] = await take(sub, 3);
    assert.equal(bin.data, null);
    assert.deepEqual(bin.bytes, all);
    assert.equal(text.data, "plain é");
    assert.deepEqual(text.bytes, new TextEncoder().encode("plain é"));
    assert.equal(empty.bytes.length, 0);
  }));

test("text of control characters up to max_payload is taken (data64, not a 6x escaped frame), and arrives intact", open, () =>
  withConns(URL_OPEN, 1, async (c) => {
    // Escaped as JSON this would be 6 × max_payload: past the frame limit, a 1009 close.
    await c.publish(fresh("nobody.controls"), "\u0001".repeat(c.maxPayload));
    await c.ping(); // still open
    const s = fresh("controls");
    const sub = c.subscribe(s);
    await sub.ready;
    const text = "\u0000\u0001\u001f tab\t".repeat(5000);
    await c.publish(s, text);
    await c.publish(s, "lone \ud800 surrogate"); // becomes U+FFFD, as WebSocket.send makes it
    const [controls, lone] = await take(sub, 2);
    assert.equal(controls.data, text);
    assert.equal(lone.data, "lone \ufffd surrogate");
  }));

test("unsubscribe stops delivery", open, () =>
  withConns(URL_OPEN, 1, async (c) => {
    const s = fresh("unsub");
    const gone = c.subscribe(s);
    const marker = c.subscribe(s);
    await Promise.all([gone.ready, marker.ready]);
    await c.publish(s, "1");
    await take(gone, 1);
    await gone.unsubscribe();
    assert.equal(gone.active, false);
    await c.publish(s, "2");
    await take(marker, 2); // "2" was delivered (and after it, nothing is in flight)
    const it = gone[Symbol.asyncIterator]();
    assert.deepEqual(await it.next(), { value: undefined, done: true });
  }));

test("the broker's errors keep the connection open: bad subject, oversized payload", open, () =>
  withConns(URL_OPEN, 1, async (c) => {
    await rejectsKind(c.publish("bad..subject", "x"), "InvalidInput");
    const bad = c.subscribe("a.>.b");
    await rejectsKind(bad.ready, "InvalidInput");
    await rejectsKind(c.publish("ok.subject", new Uint8Array(c.maxPayload + 1)), "LimitExceeded");
    await c.ping();
    await c.publish("ok.subject", "fine");
  }));

test("the iterator's buffer is bounded: the oldest unread messages are dropped and counted", open, () =>
  withConns(URL_OPEN, 1, async (c) => {
    const s = fresh("bound");
    const sub = c.subscribe(s, { maxPending: 5 });
    const marker = c.subscribe(s);
    await Promise.all([sub.ready, marker.ready]);
    for (let i = 0; i < 12; i++) await c.publish(s, `${i}`);
    await take(marker, 12); // by now every message reached `sub` too
    assert.equal(sub.dropped, 7);
    assert.deepEqual((await take(sub, 5)).map((m) => m.data), ["7", "8", "9", "10", "11"]);
  }));

test(
  "after the connection drops it reconnects, re-subscribes, and failed operations were Unavailable",
  { skip: !URL_DROP && "COURIER_WS_DROP_URL not set" },
  async () => {
    const statuses = [];
    const c = await connect(URL_DROP, { name: "dropped", reconnectDelay: 50, maxReconnectDelay: 200, onStatus: (s) => statuses.push(s) });
    try {
      await withConns(URL_OPEN ?? URL_DROP, 1, async (other) => {
        const s = fresh("survivor");
        const sub = c.subscribe(s);
        const mute = other.subscribe(fresh("mute"));
        await Promise.all([sub.ready, mute.ready]);
        const hanging = c.request(mute.subject, "x", { timeout: 20000 });
        const reconnected = within(
          new Promise((resolve) => {
            c.onStatus = (st) => {
              statuses.push(st);
              if (st === "connected") resolve();
            };
          }),
          WAIT * 2,
          "reconnect",
        );
        await c.publish("test.drop", "now"); // the proxy cuts every connection
        await rejectsKind(within(hanging, WAIT, "the hanging request to fail"), "Unavailable");
        await reconnected;
        assert.deepEqual(statuses, ["connected", "reconnecting", "connected"]);
        // The subscription was sent again: a message from elsewhere arrives.
        // (Retry: the re-sent `sub` races the publish, so publish until it
        // lands, keeping one `next()` waiting: an abandoned one would take
        // the message.)
        const next = sub[Symbol.asyncIterator]().next();
        let landed = false;
        const got = await within(
          (async () => {
            const tick = () => new Promise((res) => setTimeout(() => res(false), 100));
            while (!landed) {
              await other.publish(s, "after");
              landed = await Promise.race([next.then(() => true), tick()]);
            }
            return (await next).value;
          })(),
          WAIT,
          "a message on the re-sent subscription",
        );
        assert.equal(got.data, "after");
        await c.publish(s, "and publishing works again");
      });
    } finally {
      await c.close();
    }
  },
);

const auth = { skip: !(URL_TOKEN && TOKEN) && "COURIER_WS_TOKEN_URL or COURIER_TOKEN not set" };

test("a wrong or missing token is Refused, and not retried", auth, async () => {
  const refused = (options) =>
    connect(URL_TOKEN, { timeout: WAIT, ...options }).then(
      (c) => (c.close(), assert.fail("connected")),
      (e) => e,
    );
  for (const e of [await refused({ token: "wrong" }), await refused({})]) {
    assert.ok(e instanceof CourierError);
    assert.equal(e.kind, "Refused", e.message);
    assert.equal(e.retryable, false);
  }
});

test("permissions: a forbidden publish, subscribe or request is Refused, the connection stays", auth, () =>
  withConns(
    URL_TOKEN,
    1,
    async (c) => {
      assert.equal(c.identity, "alice");
      await rejectsKind(c.publish("forbidden.x", "x"), "Refused");
      const sub = c.subscribe("forbidden.>");
      await rejectsKind(sub.ready, "Refused");
      assert.equal(sub.active, false);
      await rejectsKind(c.request("forbidden.svc", "x", { timeout: 1000 }), "Refused");
      // Allowed work goes on, on the same connection.
      const s = fresh("allowed");
      const ok = c.subscribe(s);
      await ok.ready;
      await c.publish(s, "yes");
      assert.equal((await take(ok, 1))[0].data, "yes");
      assert.equal((await c.request("svc.echo", "ok", { timeout: WAIT })).data, "OK");
    },
    { token: TOKEN },
  ));
