// Seeded fuzzing of the running daemon's WebSocket RPC: malformed, truncated,
// oversized, wrong-typed, out-of-order and random frames, plus mutations of
// real (already consumed) traffic, pipelined over several connections. What
// must hold: the daemon never crashes, every answer is a documented error
// code (or a harmless read-only result), nothing authenticates by accident,
// and the state digest of the SQLite file is the same before and after.
//
// Suite: BKV_FUZZ_FRAMES (default 10 000) frames, seed BKV_FUZZ_SEED (default
// 20261127): 100 000 took 34 s alone but 53 s beside the rest of the suite on the
// 2-core machine, so the suite runs the first tenth (every kind of frame still
// comes up hundreds of times) and ./scripts/fuzz runs 100 000 (or any count and
// seed: ./scripts/fuzz 1000000 7). Figures in docs/SECURITY.md.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import fc from 'fast-check';
import { p256 } from '@noble/curves/nist.js';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { TEST_KDF } from '../helpers/vault.js';
import {
  RawSocket,
  advConfig,
  RecordingTransport,
  LeakScan,
  classifyAnswer,
  pinnedKeyOf,
  stateDigest,
  waitFor,
} from '../helpers/adversarial.js';
import { VaultClient, Channel } from '../../client/sdk.js';
import { startOprf, finishOprf, openRecovered, type PendingOprf } from '../../client/protocol.js';
import type { KdfParams } from '../../protocol/kdf.js';
import { channelIdOf } from '../../protocol/channel.js';
import { fromB64, toB64 } from '../../protocol/bytes.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';

const FRAMES = Number(process.env.BKV_FUZZ_FRAMES ?? 10_000);
const SEED = Number(process.env.BKV_FUZZ_SEED ?? 20261127);
const CONNECTIONS = 4;
/** Answers outstanding per connection: under the daemon's 64 in flight, so OVERLOADED is never our pacing's fault. */
const WINDOW = 48;
const CHUNK = 2_000;

let d: RunningDaemon;
const wire: string[] = [];
const leaks = new LeakScan();
const LIVE = ['fz-alice', 'fz-bob', 'fz-carol', 'fz-dave', 'fz-erin'];
/** Users a well-formed record.delete would really delete (active or locked): a real delete is not malformed input. */
const DELETABLE = [...LIVE, 'fz-locked'];
const ALL_USERS = [...LIVE, 'fz-locked', 'fz-deleted', 'fz-ghost', 'nobody'];
/** Captured requests of finished flows: every one is spent, so a replay can only be refused. */
const corpus: string[] = [];
const passwords = new Map<string, string>();
let live: { ch: Channel; oprf: PendingOprf; evaluated: Uint8Array; kdf: KdfParams; transport: RecordingTransport } | undefined;

beforeAll(async () => {
  d = await startDaemon({ config: advConfig({ limits: { tenantPerSec: 1e7, tenantBurst: 1e7, userPerMin: 1e9, userBurst: 1e7 } }) });
  leaks.text('wire', () => wire);
  leaks.daemon(d);
  leaks.secret('HSM SO PIN', readFileSync(join(d.dataDir, 'hsm-so-pin'), 'utf8').trim());

  // Real traffic to mutate: every flow runs to its end, so each captured channel is spent.
  const rec: string[] = [];
  const t = new RecordingTransport(d.url, d.token, rec);
  const c = new VaultClient({ transport: t, pinnedKey: pinnedKeyOf(d), kdf: TEST_KDF, maxRetries: 0 });
  for (const u of [...LIVE, 'fz-locked', 'fz-deleted']) {
    const pw = `fuzz-pw-${u}-${randomBytes(4).toString('hex')}`;
    passwords.set(u, pw);
    const k = new Uint8Array(randomBytes(32));
    leaks.secret(`password of ${u}`, pw);
    leaks.secret(`K of ${u}`, k);
    await c.enrollPassword(u, pw, k);
    if (u === 'fz-bob') await c.changePassword(u, pw, pw + '!');
    if (u === 'fz-carol') await c.recoverWithPassword(u, pw).catch(() => undefined);
    if (u === 'fz-dave') await c.recoverWithPassword(u, 'not it').catch(() => undefined);
    if (u === 'fz-locked') for (let i = 0; i < 10; i++) await c.recoverWithPassword(u, `wrong-${i}`).catch(() => undefined);
    if (u === 'fz-deleted') await c.delete(u);
  }
  await c.status('fz-alice');
  for (const line of rec) {
    const m = JSON.parse(line) as { method?: string; params?: { channel?: { id?: string } } };
    if (m.method) corpus.push(JSON.stringify({ jsonrpc: '2.0', id: corpus.length + 1, method: m.method, params: m.params }));
    if (m.params?.channel?.id) knownChannelIds.push(m.params.channel.id);
  }
  // One channel left open mid-recovery: the fuzzer aims at it, and its owner finishes it afterwards.
  const desc = await c.descriptor();
  const ch = new Channel(desc, 'fz-erin', Date.now);
  const oprf = startOprf(desc.vaultId, 'fz-erin', passwords.get('fz-erin')!);
  const begun = (await ch.open('recover.begin', await t.call('recover.begin', await ch.seal('recover.begin', { blinded: toB64(oprf.blinded) })))) as {
    evaluated: string;
    kdf: KdfParams;
  };
  live = { ch, oprf, evaluated: fromB64(begun.evaluated)!, kdf: begun.kdf, transport: t };
  liveChannel = { id: toB64(ch.id), userId: 'fz-erin' };
  wire.push(...rec);
}, 120_000);

afterAll(async () => {
  await d?.cleanup();
});

// ---- generators ---------------------------------------------------------------

const P = p256.Point;
const validPoints = Array.from({ length: 32 }, () => p256.getPublicKey(p256.utils.randomSecretKey(), false));
const FIELD_P = P.Fp.ORDER;
const be32 = (n: bigint) => Buffer.from(n.toString(16).padStart(64, '0'), 'hex');
const badPoints: Record<string, Uint8Array> = {
  identity: new Uint8Array([4, ...new Uint8Array(64)]),
  zeros: new Uint8Array(65),
  offCurve: (() => {
    const q = new Uint8Array(validPoints[0]!);
    q[64]! ^= 1;
    return q;
  })(),
  // (x, 0) lies on y² = x³ − 3x + b' for some b' ≠ b: an order-2 point of an invalid curve.
  smallOrder: new Uint8Array([4, ...be32(5n), ...new Uint8Array(32)]),
  xNotReduced: new Uint8Array([4, ...be32(FIELD_P + 1n), ...validPoints[1]!.slice(33)]),
  hybrid: new Uint8Array([6, ...validPoints[2]!.slice(1)]),
  compressed: new Uint8Array([2, ...validPoints[3]!.slice(1, 33)]),
  generator: P.BASE.toBytes(false),
};

/** A base64url spelling the vault must refuse (padding, +/, stray bits, spaces). */
function misspell(b: Uint8Array, how: number): string {
  const s = toB64(b);
  switch (how % 5) {
    case 0:
      return Buffer.from(b).toString('base64'); // padded, maybe + and /
    case 1:
      return s.length % 4 === 0 ? s + 'A' : s.slice(0, -1) + (s.endsWith('B') ? 'C' : 'B'); // stray low bits
    case 2:
      return ` ${s}`;
    case 3:
      return s + '=';
    default:
      return s.replace(/./, '*');
  }
}

const bytes = (min: number, max: number) => fc.uint8Array({ minLength: min, maxLength: max });
const weirdNumber = fc.oneof(
  fc.constantFrom(-1, 1.5, 1001, 2 ** 31, 2 ** 53, -(2 ** 53), 1e308, Number.MIN_VALUE, -0),
  fc.integer(),
  fc.double({ noNaN: true }),
);
const jsonish = fc.jsonValue({ maxDepth: 3 });
const userIdArb = fc.oneof(
  { arbitrary: fc.constantFrom(...ALL_USERS), weight: 5 },
  { arbitrary: fc.constantFrom('', ' ', 'a\nb', 'a\u0000b', 'e\u0301', '\u212b', 'x'.repeat(129), 'é'.repeat(65), 'x'.repeat(513), '\ud800', '__proto__'), weight: 2 },
  { arbitrary: fc.string({ unit: 'binary', maxLength: 40 }), weight: 2 },
  { arbitrary: jsonish, weight: 1 },
);

interface Frame {
  data: string | Buffer;
  binary?: boolean;
  kind: string;
}

/** Channel ids seen in the captured traffic (all closed) and of the one channel left open. */
const knownChannelIds: string[] = [];
let liveChannel: { id: string; userId: string } | undefined;

/**
 * Channel messages that mostly pass the schema, so they reach the checks behind
 * it (freshness, channel id, replay cache, point validation, the HSM, GCM), with
 * one field corrupted in about half of them.
 */
function channelArb(now: number): fc.Arbitrary<Frame> {
  const point = fc.oneof(
    { arbitrary: fc.constantFrom(...Object.entries(badPoints)), weight: 2 },
    { arbitrary: fc.constantFrom(...validPoints).map((p) => ['valid', p] as [string, Uint8Array]), weight: 3 },
    { arbitrary: bytes(0, 80).map((b) => ['random', b] as [string, Uint8Array]), weight: 1 },
  );
  const corruption = fc.oneof(
    { arbitrary: fc.constant('none'), weight: 10 },
    { arbitrary: fc.constantFrom('id-spelling', 'id-length', 'epk-spelling', 'n', 'ts', 'ct-spelling', 'drop', 'extra', 'userId', 'type'), weight: 10 },
  );
  return fc
    .record({
      method: fc.constantFrom('enroll.begin', 'enroll.finish', 'recover.begin', 'recover.finish'),
      userId: fc.oneof({ arbitrary: fc.constantFrom(...ALL_USERS), weight: 6 }, { arbitrary: userIdArb, weight: 1 }),
      target: fc.constantFrom('known', 'live', 'epk', 'epk', 'epk', 'random'),
      known: fc.nat(),
      epk: point,
      n: fc.oneof({ arbitrary: fc.constant(0), weight: 5 }, { arbitrary: fc.integer({ min: 1, max: 4 }), weight: 4 }, { arbitrary: fc.constant(1000), weight: 1 }),
      ts: fc.oneof({ arbitrary: fc.constant(now), weight: 8 }, { arbitrary: fc.constantFrom(now - 3_600_000, now + 3_600_000, 0, now - 61_000), weight: 1 }),
      ct: fc.oneof({ arbitrary: fc.constantFrom(272, 528).chain((n) => bytes(n, n)), weight: 5 }, { arbitrary: bytes(0, 600), weight: 2 }, { arbitrary: fc.constantFrom(15, 16, 4112, 4113, 8192).chain((n) => bytes(n, n)), weight: 1 }),
      random: bytes(16, 16),
      corruption,
      bad: fc.oneof(weirdNumber, jsonish, fc.string({ maxLength: 30 })),
      spell: fc.nat(20),
      id: fc.oneof(fc.integer(), fc.string({ maxLength: 8 })),
    })
    .map((r) => {
      const [pointKind, epk] = r.epk;
      let userId: unknown = r.userId;
      let id: string;
      if (r.target === 'known' && knownChannelIds.length) id = knownChannelIds[r.known % knownChannelIds.length]!;
      else if (r.target === 'live' && liveChannel) {
        id = liveChannel.id;
        if (r.known % 3) userId = liveChannel.userId;
      } else if (r.target === 'random') id = toB64(r.random);
      else id = toB64(channelIdOf(epk));
      const ch: Record<string, unknown> = { id, ...(r.n === 0 || r.known % 7 === 0 ? { epk: toB64(epk) } : {}), n: r.n, ts: r.ts, ct: toB64(r.ct) };
      const params: Record<string, unknown> = { userId, channel: ch };
      const fields = ['id', 'epk', 'n', 'ts', 'ct'];
      switch (r.corruption) {
        case 'id-spelling':
          ch.id = misspell(r.random, r.spell);
          break;
        case 'id-length':
          ch.id = toB64(r.ct.subarray(0, r.spell));
          break;
        case 'epk-spelling':
          ch.epk = misspell(epk, r.spell);
          break;
        case 'n':
        case 'ts':
          ch[r.corruption] = r.bad;
          break;
        case 'ct-spelling':
          ch.ct = misspell(r.ct, r.spell);
          break;
        case 'drop':
          delete ch[fields[r.spell % fields.length]!];
          break;
        case 'extra':
          (r.spell % 2 ? ch : params)[`x${r.spell}`] = r.bad;
          break;
        case 'userId':
          params.userId = r.bad;
          break;
        case 'type':
          ch[fields[r.spell % fields.length]!] = r.bad;
          break;
      }
      return { kind: `channel:${r.target}:${pointKind}:${r.corruption}`, data: JSON.stringify({ jsonrpc: '2.0', id: r.id, method: r.method, params }) };
    });
}

const envelopeArb: fc.Arbitrary<Frame> = fc
  .record({
    jsonrpc: fc.oneof(fc.constantFrom('2.0', '2.0', '2.0', '1.0', '2', 2, null), jsonish),
    hasJsonrpc: fc.boolean(),
    // 1e400 is Infinity on purpose (a hostile id).
    // eslint-disable-next-line no-loss-of-precision
    id: fc.oneof(fc.integer(), fc.string({ maxLength: 10 }), fc.constantFrom(null, true, 1.5, -0, 1e400, 2 ** 64), jsonish),
    hasId: fc.nat(5),
    method: fc.oneof(
      fc.constantFrom('vault.descriptor', 'record.status', 'record.delete', 'health', 'enroll.begin', 'enroll.finish', 'recover.begin', 'recover.finish'),
      fc.constantFrom('__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf', 'vault.rotate', 'admin.rotate', 'Health', 'health ', '', 'record.status\u0000', 'x'.repeat(5000)),
      fc.string({ maxLength: 20 }),
      jsonish,
    ),
    params: fc.oneof(
      { arbitrary: fc.record({ userId: userIdArb }), weight: 4 },
      { arbitrary: fc.record({ userId: userIdArb, extra: jsonish }), weight: 1 },
      { arbitrary: fc.constantFrom({}, [], null, 0, 'x', { userId: null }, JSON.parse('{"__proto__":{"userId":"fz-alice"}}') as object), weight: 1 },
      { arbitrary: jsonish, weight: 2 },
    ),
    hasParams: fc.nat(6),
  })
  .map((r) => {
    const o: Record<string, unknown> = {};
    if (r.hasJsonrpc) o.jsonrpc = r.jsonrpc;
    if (r.hasId > 0) o.id = r.id;
    o.method = r.method;
    if (r.hasParams > 0) o.params = r.params;
    return { kind: 'envelope', data: JSON.stringify(o) };
  });

type Mutation = { op: number; pos: number; len: number; val: unknown; text: string };
const mutationArb: fc.Arbitrary<Mutation> = fc.record({
  op: fc.nat(11),
  pos: fc.nat(),
  len: fc.nat(64),
  val: jsonish,
  text: fc.oneof(fc.constantFrom('{', '}', '"', ',', ':', '\\', '\\u0000', '\\ud800', 'null', '[', ']', '1e999', '-', 'A'), fc.string({ maxLength: 4 })),
});

function paths(v: unknown, at: (string | number)[] = [], out: (string | number)[][] = []): (string | number)[][] {
  if (v && typeof v === 'object') {
    for (const [k, x] of Object.entries(v)) {
      const p = [...at, Array.isArray(v) ? Number(k) : k];
      out.push(p);
      paths(x, p, out);
    }
  }
  return out;
}

function applyMutation(s: string, m: Mutation): string {
  const i = s.length ? m.pos % s.length : 0;
  switch (m.op) {
    case 0: // replace one character
      return s.slice(0, i) + m.text.slice(0, 1) + s.slice(i + 1);
    case 1: // delete a span
      return s.slice(0, i) + s.slice(i + m.len);
    case 2: // duplicate a span
      return s.slice(0, i + m.len) + s.slice(i, i + m.len) + s.slice(i + m.len);
    case 3: // truncate
      return s.slice(0, i);
    case 4: // insert a token
      return s.slice(0, i) + m.text + s.slice(i);
    default: {
      // structural: on the parsed value, when it still parses
      let v: unknown;
      try {
        v = JSON.parse(s);
      } catch {
        return s + m.text;
      }
      const ps = paths(v);
      if (!ps.length) return JSON.stringify(m.val);
      const p = ps[m.pos % ps.length]!;
      const parent = p.slice(0, -1).reduce<unknown>((o, k) => (o as Record<string | number, unknown>)[k], v) as Record<string | number, unknown>;
      const key = p[p.length - 1]!;
      const old = parent[key];
      if (m.op === 5) delete parent[key];
      else if (m.op === 6) parent[key] = m.val;
      else if (m.op === 7 && typeof old === 'string') {
        // flip one bit of a base64url value, or change a character of a string
        const b = Buffer.from(old, 'base64url');
        if (b.length && Buffer.from(b).toString('base64url') === old) {
          b[m.pos % b.length]! ^= 1 << (m.len % 8);
          parent[key] = b.toString('base64url');
        } else parent[key] = old + m.text;
      } else if (m.op === 8 && typeof old === 'number') parent[key] = [old + 1, old - 1, -old, old * 2 ** 32, String(old)][m.len % 5];
      else if (m.op === 9 && typeof old === 'string') parent[key] = [old.slice(0, old.length >> 1), old + old, old.toUpperCase(), ALL_USERS[m.len % ALL_USERS.length]][m.len % 4];
      else if (m.op === 10) parent[key] = [old, old];
      else parent[`${String(key)}_`] = m.val;
      return JSON.stringify(v);
    }
  }
}

function mutatedArb(): fc.Arbitrary<Frame> {
  return fc
    .tuple(fc.constantFrom(...corpus), fc.array(mutationArb, { minLength: 1, maxLength: 3 }), fc.boolean())
    .map(([base, ms, replayOnly]) => {
      // A few exact replays of spent requests; the rest mutated.
      const data = replayOnly && ms[0]!.op === 11 ? base : ms.reduce(applyMutation, base);
      return { kind: data === base ? 'replay' : 'mutated', data };
    });
}

const garbageArb: fc.Arbitrary<Frame> = fc.oneof(
  { arbitrary: fc.string({ unit: 'binary', maxLength: 300 }).map((s) => ({ kind: 'garbage:text', data: s })), weight: 4 },
  { arbitrary: fc.json({ maxDepth: 4 }).map((s) => ({ kind: 'garbage:json', data: s })), weight: 4 },
  { arbitrary: bytes(0, 300).map((b) => ({ kind: 'garbage:binary', data: Buffer.from(b), binary: true })), weight: 2 },
  {
    arbitrary: fc.constantFrom(100, 1_000, 30_000).map((n) => ({ kind: 'deep-nesting', data: '['.repeat(n) + ']'.repeat(n) })),
    weight: 1,
  },
  {
    arbitrary: fc
      .constantFrom(100, 1_000, 10_000)
      .map((n) => ({ kind: 'deep-nesting', data: '{"jsonrpc":"2.0","id":1,"method":"record.status","params":' + '{"a":'.repeat(n) + '1' + '}'.repeat(n) + '}' })),
    weight: 1,
  },
  {
    arbitrary: fc.integer({ min: 5_000, max: 65_000 }).map((n) => ({ kind: 'large', data: JSON.stringify({ jsonrpc: '2.0', id: 7, method: 'record.status', params: { userId: 'x'.repeat(n) } }) })),
    weight: 1,
  },
  {
    arbitrary: fc
      .constantFrom('', ' ', 'null', '[]', '{}', '[{"jsonrpc":"2.0","id":1,"method":"health"}]', '"\\ud800"', '1e999', '{"__proto__":{"jsonrpc":"2.0"}}')
      .map((s) => ({ kind: 'garbage:edge', data: s })),
    weight: 2,
  },
);

function frameArb(now: number): fc.Arbitrary<Frame> {
  return fc.oneof(
    { arbitrary: mutatedArb(), weight: 30 },
    { arbitrary: channelArb(now), weight: 40 },
    { arbitrary: envelopeArb, weight: 15 },
    { arbitrary: garbageArb, weight: 15 },
  );
}

/** JSON-RPC id the daemon will echo for this frame (null when it cannot read a string or number one). */
function echoedId(f: Frame): string {
  if (f.binary) return 'null';
  let v: unknown;
  try {
    v = JSON.parse(Buffer.from(f.data as string).toString());
  } catch {
    return 'null';
  }
  const id = v && typeof v === 'object' && !Array.isArray(v) ? (v as { id?: unknown }).id : undefined;
  return JSON.stringify(typeof id === 'string' || typeof id === 'number' ? id : null);
}

/** A real delete of a real record is not malformed input; everything else may stay. */
function defuse(f: Frame): Frame {
  if (f.binary || typeof f.data !== 'string') return f;
  try {
    const v = JSON.parse(f.data) as { method?: unknown; params?: { userId?: unknown } };
    if (v?.method === 'record.delete' && v.params && typeof v.params === 'object' && DELETABLE.includes(v.params.userId as string)) {
      v.params.userId = 'fz-ghost';
      return { ...f, data: JSON.stringify(v), kind: f.kind + ':defused' };
    }
  } catch {
    /* not JSON: harmless */
  }
  return f;
}

// ---- the run -------------------------------------------------------------------------

interface Tally {
  sent: number;
  answers: number;
  byCode: Record<string, number>;
  byKind: Record<string, number>;
  problems: string[];
  authenticated: string[];
}

async function pump(sock: RawSocket, frames: Frame[], t: Tally): Promise<void> {
  const expected = new Map<string, number>();
  let outstanding = 0;
  let wake: (() => void) | undefined;
  sock.onAnswer = (s) => {
    outstanding--;
    t.answers++;
    const a = classifyAnswer(s);
    t.byCode[a.code] = (t.byCode[a.code] ?? 0) + 1;
    if (a.problem) t.problems.push(`${a.problem}: ${s.slice(0, 200)}`);
    if (a.code === ErrorCodes.INTERNAL) t.problems.push(`INTERNAL: ${s.slice(0, 200)}`);
    if (a.kind === 'result' && s.includes('"channel"')) t.authenticated.push(s.slice(0, 200));
    const key = JSON.stringify(a.id ?? null);
    const n = expected.get(key) ?? 0;
    if (n <= 0) t.problems.push(`answer with unexpected id ${key.slice(0, 40)}`);
    else expected.set(key, n - 1);
    wake?.();
  };
  let closed = false;
  void sock.closed.then(({ code }) => {
    closed = true;
    t.problems.push(`the daemon closed a pipelined connection (${code})`);
    wake?.();
  });
  for (const f of frames) {
    while (outstanding >= WINDOW && !closed) await new Promise<void>((r) => (wake = r));
    if (closed) return;
    const key = echoedId(f);
    expected.set(key, (expected.get(key) ?? 0) + 1);
    outstanding++;
    t.sent++;
    t.byKind[f.kind.split(':')[0]!] = (t.byKind[f.kind.split(':')[0]!] ?? 0) + 1;
    sock.send(f.data, f.binary);
  }
  const done = await waitFor(() => outstanding === 0 || closed, 60_000, 10);
  if (process.env.BKV_FUZZ_DEBUG) console.log(`pump: ${frames.length} sent, outstanding ${outstanding}`);
  if (!done) t.problems.push(`${outstanding} frames never answered`);
  const left = [...expected.values()].reduce((a, b) => a + b, 0);
  if (left) t.problems.push(`${left} expected answers missing`);
}

/** Frames that must close the connection: each on its own socket. */
async function closers(rand: () => number, count: number): Promise<{ byClose: Record<string, number>; problems: string[] }> {
  const byClose: Record<string, number> = {};
  const problems: string[] = [];
  const kinds = ['oversize', 'utf8', 'rawws'] as const;
  const RAW: Buffer[] = [
    Buffer.from([0xc1, 0x80, 0, 0, 0, 0]), // RSV1 without an extension
    Buffer.from([0x83, 0x80, 0, 0, 0, 0]), // reserved opcode 3
    Buffer.from([0x81, 0x05, 0x68, 0x65, 0x6c, 0x6c, 0x6f]), // unmasked client frame
    Buffer.from([0x89, 0xfe, 0x00, 0x80, 0, 0, 0, 0]), // ping with a 128-byte payload (control frames max 125)
    Buffer.from([0x09, 0x80, 0, 0, 0, 0]), // fragmented control frame
    Buffer.from([0x81, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]), // 2^63-1 length
  ];
  for (let i = 0; i < count; i++) {
    const kind = kinds[i % kinds.length]!;
    const sock = await RawSocket.open(d.url, d.token);
    let want: number[];
    if (kind === 'oversize') {
      sock.send('{"jsonrpc":"2.0","id":1,"method":"health","params":{"p":"' + 'x'.repeat(64 * 1024 + Math.floor(rand() * 100_000)) + '"}}');
      want = [1009];
    } else if (kind === 'utf8') {
      sock.send(Buffer.concat([Buffer.from('{"jsonrpc":"2.0","id":1,"method":"'), Buffer.from([0xff, 0xfe, 0xc0, 0x80]), Buffer.from('"}')]), false);
      want = [1007];
    } else {
      (sock.ws as unknown as { _socket: { write(b: Buffer): void } })._socket.write(RAW[Math.floor(rand() * RAW.length)]!);
      want = [1002, 1009, 1006];
    }
    const timeout = new Promise<{ code: number }>((r) => setTimeout(() => r({ code: -1 }), 5_000));
    const { code } = await Promise.race([sock.closed, timeout]);
    byClose[`${kind}:${code}`] = (byClose[`${kind}:${code}`] ?? 0) + 1;
    if (!want.includes(code)) problems.push(`${kind} frame: connection closed with ${code}, expected ${want.join('/')}`);
    sock.ws.terminate();
  }
  return { byClose, problems };
}

describe(`fuzzing the daemon with ${FRAMES} seeded frames (seed ${SEED})`, () => {
  it('never crashes, answers only documented codes, and changes no record', async () => {
    const before = stateDigest(join(d.dataDir, 'vault.db'));
    expect(before.records).toBe(7);
    expect(knownChannelIds.length).toBeGreaterThan(10);
    const t: Tally = { sent: 0, answers: 0, byCode: {}, byKind: {}, problems: [], authenticated: [] };
    const socks = await Promise.all(Array.from({ length: CONNECTIONS }, () => RawSocket.open(d.url, d.token, wire)));
    const started = Date.now();
    let defused = 0;
    for (let c = 0; c * CHUNK < FRAMES; c++) {
      const n = Math.min(CHUNK, FRAMES - c * CHUNK);
      // Generated per chunk so "fresh" timestamps stay fresh however long the run.
      const g0 = Date.now();
      const frames = fc.sample(frameArb(Date.now()), { seed: SEED + c, numRuns: n }).map(defuse);
      if (process.env.BKV_FUZZ_DEBUG) console.log(`chunk ${c}: generated ${n} in ${Date.now() - g0} ms`);
      defused += frames.filter((f) => f.kind.endsWith(':defused')).length;
      await Promise.all(socks.map((s, i) => pump(s, frames.filter((_, j) => j % CONNECTIONS === i), t)));
    }
    let r = SEED;
    const rand = () => ((r = (r * 1103515245 + 12345) >>> 0) / 2 ** 32);
    const closeRuns = Math.max(30, Math.round(FRAMES / 500));
    const cl = await closers(rand, closeRuns);
    const seconds = (Date.now() - started) / 1000;

    // Still alive, still serving, same state.
    expect(d.proc.exitCode).toBeNull();
    const probe = await RawSocket.open(d.url, d.token);
    expect((await probe.call('health', {})).result).toMatchObject({ status: 'ok' });
    probe.close();
    for (const s of socks) s.close();
    const after = stateDigest(join(d.dataDir, 'vault.db'));

    const report = { seed: SEED, frames: t.sent, closers: closeRuns, seconds, perSecond: Math.round(t.sent / seconds), defused, byKind: t.byKind, byCode: t.byCode, byClose: cl.byClose };
    console.log(`fuzz report ${JSON.stringify(report)}`);
    expect(t.problems.slice(0, 10)).toEqual([]);
    expect(cl.problems.slice(0, 10)).toEqual([]);
    expect(t.authenticated).toEqual([]);
    expect(t.sent).toBe(FRAMES);
    expect(t.answers).toBe(FRAMES);
    expect(after).toEqual(before);
    // Nothing unexpected in the daemon's own words: no internal error, no unhandled rejection, no crash report.
    const bad = d.logs.filter((l) => /"level":(50|60)|rpc\.internal|channel\.internal|Unhandled|uncaught|FATAL|RangeError|TypeError/i.test(l));
    expect(bad.slice(0, 5)).toEqual([]);
  }, Math.max(180_000, FRAMES * 10));

  it('the seeded users still work afterwards (state intact, not just unchanged)', async () => {
    const c = new VaultClient({ transport: new RecordingTransport(d.url, d.token, wire), pinnedKey: pinnedKeyOf(d), kdf: TEST_KDF, maxRetries: 0 });
    expect(await c.status('fz-alice')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    expect(await c.status('fz-dave')).toMatchObject({ state: 'active', attemptsLeft: 9 });
    expect(await c.status('fz-erin')).toMatchObject({ state: 'active', attemptsLeft: 9 });
    // The channel the fuzzer hammered (tampered, replayed, reordered, mis-routed copies) is still usable by its owner.
    const { ch, oprf, evaluated, kdf, transport } = live!;
    const keys = await finishOprf(oprf, evaluated, kdf);
    leaks.secret('authKey of fz-erin', keys.authKey);
    const finish = ch.seal('recover.finish', { authKey: toB64(keys.authKey) });
    const reply = await transport.call('recover.finish', await finish).catch((e: VaultError) => e);
    if (reply instanceof VaultError) {
      // Only a run longer than the 120 s session may lose it (scripts/fuzz): then it is expired, nothing else.
      expect(reply.code).toBe(ErrorCodes.SESSION_EXPIRED);
    } else {
      const r = (await ch.open('recover.finish', reply)) as { outcome: string; envelope: string };
      expect(r.outcome).toBe('ok');
      const k = await openRecovered(oprf, keys, fromB64(r.envelope)!);
      expect(k.length).toBe(32);
      expect(await c.status('fz-erin')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    }
    transport.close();
    expect(await c.status('fz-locked')).toMatchObject({ state: 'locked' });
    expect(await c.status('fz-deleted')).toMatchObject({ state: 'deleted' });
    await expect(c.recoverWithPassword('fz-locked', 'x')).rejects.toMatchObject({ code: ErrorCodes.LOCKED });
    const err = await c.recoverWithPassword('fz-alice', 'wrong').catch((e: VaultError) => e);
    expect(err).toMatchObject({ code: ErrorCodes.WRONG_PASSWORD, detail: { attemptsLeft: 9 } });
  });

  it('leaks no password, key or PIN into the wire, the logs, the database or the audit log', () => {
    const r = leaks.scan();
    console.log(`fuzz leak scan: ${r.secrets} secrets x ${r.places} places (${r.bytes} bytes)`);
    expect(r.secrets).toBeGreaterThanOrEqual(16);
    expect(r.hits).toEqual([]);
  });
});
