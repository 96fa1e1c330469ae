// Shared tools of the adversarial tests (test/adversarial-*.test.ts) and of
// scripts/fuzz and scripts/load: a raw pipelining WebSocket client, a
// recording transport, a state digest of the SQLite file, a leak scanner and
// small statistics. Nothing here talks to the vault except over its public
// surfaces (the socket, the database file read-only, the log lines).
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import WebSocket from 'ws';
import { TEST_CONFIG, type RunningDaemon } from './daemon.js';
import { readVaultKey } from '../../client/cli.js';
import { WebSocketTransport, type Transport } from '../../client/transport.js';
import { ErrorCodes, JSONRPC_FRAMING, VaultError, errorSpec } from '../../protocol/errors.js';
import { p256 } from '@noble/curves/nist.js';
import { channelKeys, clientHandshake, openMessage, sealMessage, type ChannelKeys } from '../../protocol/channel.js';
import type { Descriptor } from '../../protocol/descriptor.js';
import { fromB64, toB64 } from '../../protocol/bytes.js';
import type { KdfParams } from '../../protocol/kdf.js';
import { finishOprf, startOprf } from '../../client/protocol.js';

// ---- documented wire vocabulary (docs/RPC.md, protocol/errors.ts) ---------------

/** Every code the vault may put in error.data.code (the key ceremony's are bkv-admin's only). */
export const DOCUMENTED_CODES: ReadonlySet<string> = new Set(Object.values(ErrorCodes).filter((c) => !c.startsWith('CEREMONY_')));
/** The JSON-RPC integers an answer with this data.code may carry: the error table's (docs/RPC.md), plus JSON-RPC's own for BAD_REQUEST. */
export function documentedInts(code: string): readonly number[] {
  const spec = errorSpec(code);
  if (!spec) return [];
  return code === ErrorCodes.BAD_REQUEST ? [spec.jsonrpc, ...Object.values(JSONRPC_FRAMING)] : [spec.jsonrpc];
}

export function pinnedKeyOf(d: RunningDaemon): Uint8Array {
  return readVaultKey(d.vaultKeyFile);
}

/** Checks one answer frame against the documented shape; returns what it was ("result" or the error code). */
export function classifyAnswer(text: string): { kind: 'result' | 'error'; code: string; id: unknown; problem?: string } {
  let m: { jsonrpc?: unknown; id?: unknown; result?: unknown; error?: { code?: unknown; message?: unknown; data?: { code?: unknown; retryable?: unknown } } };
  try {
    m = JSON.parse(text);
  } catch {
    return { kind: 'error', code: '?', id: null, problem: 'answer is not JSON' };
  }
  if (m.jsonrpc !== '2.0') return { kind: 'error', code: '?', id: m.id, problem: 'answer without jsonrpc 2.0' };
  if ('result' in m && !('error' in m)) return { kind: 'result', code: 'result', id: m.id };
  const e = m.error;
  const code = typeof e?.data?.code === 'string' ? e.data.code : '?';
  let problem: string | undefined;
  if (!e || typeof e.message !== 'string') problem = 'error without message';
  else if (!DOCUMENTED_CODES.has(code)) problem = `undocumented data.code ${String(code)}`;
  else if (typeof e.code !== 'number' || !documentedInts(code).includes(e.code)) problem = `JSON-RPC code ${String(e.code)} is not the table's for ${code}`;
  else if (e.data?.retryable !== errorSpec(code)?.retryable) problem = `data.retryable is not the table's for ${code}`;
  return { kind: 'error', code, id: m.id, ...(problem ? { problem } : {}) };
}

// ---- a raw, pipelining WebSocket client -------------------------------------------

/** One authenticated socket that sends whatever it is given and records everything. */
export class RawSocket {
  readonly answers: string[] = [];
  private waiters: ((s: string) => void)[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  private nextId = 1_000_000_000;
  private readonly byId = new Map<number, (v: string) => void>();
  onAnswer: ((s: string) => void) | undefined;

  private constructor(
    readonly ws: WebSocket,
    /** Answers are recorded here (for leak scans); sent frames too when `recordSent`. */
    private readonly wire?: string[],
    private readonly recordSent = false,
  ) {
    this.closed = new Promise((r) => ws.once('close', (code, reason) => r({ code, reason: reason.toString() })));
    ws.on('error', () => {});
    ws.on('message', (data) => {
      const s = data.toString();
      this.wire?.push(s);
      this.answers.push(s);
      let id: unknown;
      try {
        id = (JSON.parse(s) as { id?: unknown }).id;
      } catch {
        /* classified by the caller */
      }
      const byId = typeof id === 'number' ? this.byId.get(id) : undefined;
      if (byId) {
        this.byId.delete(id as number);
        return byId(s);
      }
      this.onAnswer?.(s);
      this.waiters.shift()?.(s);
    });
  }

  static open(url: string, token: string, wire?: string[], recordSent = false): Promise<RawSocket> {
    const ws = new WebSocket(url, { headers: { authorization: `Bearer ${token}` }, maxPayload: 1 << 20 });
    return new Promise((resolve, reject) => {
      ws.once('open', () => resolve(new RawSocket(ws, wire, recordSent)));
      ws.once('error', reject);
    });
  }

  send(data: string | Buffer, binary = false): void {
    if (this.recordSent && typeof data === 'string') this.wire?.push(data);
    this.ws.send(data, { binary });
  }

  /** The next answer not claimed by call(). */
  next(): Promise<string> {
    return new Promise((r) => this.waiters.push(r));
  }

  /** A well-formed request; resolves with the parsed answer. */
  call(method: string, params: unknown): Promise<{ result?: unknown; error?: { code: number; message: string; data: { code: string; retryable: boolean } & Record<string, unknown> } }> {
    const id = this.nextId++;
    return new Promise((resolve) => {
      this.byId.set(id, (s) => resolve(JSON.parse(s)));
      this.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
    });
  }

  close(): void {
    this.ws.close();
  }
}

/** A transport (for VaultClient) that records every frame it carries, for the leak scans. */
export class RecordingTransport implements Transport {
  readonly inner: WebSocketTransport;
  constructor(
    url: string,
    token: string,
    private readonly wire: string[],
    timeoutMs = 30_000,
  ) {
    this.inner = new WebSocketTransport({ url, token, timeoutMs });
  }
  async call(method: string, params: object): Promise<unknown> {
    this.wire.push(JSON.stringify({ method, params }));
    try {
      const r = await this.inner.call(method, params);
      this.wire.push(JSON.stringify(r));
      return r;
    } catch (e) {
      this.wire.push(JSON.stringify({ error: (e as VaultError).code, message: (e as Error).message, detail: (e as VaultError).detail }));
      throw e;
    }
  }
  close(): void {
    this.inner.close();
  }
}

/** Every error message codeOf() saw, for the leak scans ("error messages contain no secret"). */
export const errorsSeen: string[] = [];

export async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    if (e instanceof VaultError) {
      errorsSeen.push(`${e.code}: ${e.message} ${JSON.stringify(e.detail ?? {})}`);
      return e.code;
    }
    throw e;
  }
  return 'NO_ERROR';
}

// ---- state digest ------------------------------------------------------------------

const META_KEYS = ['vault_id', 'state_seq', 'state_root'];

/**
 * SHA-256 over every record row, every bucket hash and the state metadata, read
 * through a second, read-only SQLite connection (WAL lets it run beside the
 * daemon). Equal digests mean no record, counter or anchor state changed.
 */
/**
 * `logical`: only what the state means (rows, root, vault id), not how it is laid out: an undo
 * leaves the batch number moved on and an emptied bucket's row holding the empty hash.
 */
export function stateDigest(dbPath: string, opts: { logical?: boolean } = {}): { digest: string; records: number } {
  const db = new Database(dbPath, { readonly: true, fileMustExist: true });
  try {
    const h = createHash('sha256');
    let records = 0;
    for (const r of db.prepare('SELECT * FROM records ORDER BY user_id').iterate()) {
      h.update(JSON.stringify(r));
      records++;
    }
    if (!opts.logical) for (const r of db.prepare('SELECT id, hex(hash) AS hash FROM buckets ORDER BY id').iterate()) h.update(JSON.stringify(r));
    for (const k of META_KEYS) if (k !== 'state_seq' || !opts.logical) h.update(JSON.stringify(db.prepare('SELECT value FROM meta WHERE key = ?').get(k) ?? null));
    return { digest: h.digest('hex'), records };
  } finally {
    db.close();
  }
}

// ---- leak scanning ------------------------------------------------------------------

/** Every spelling a secret could take in a text or binary haystack, including inside a longer base64 run. */
export function spellings(secret: Uint8Array | string): Buffer[] {
  const b = typeof secret === 'string' ? Buffer.from(secret, 'utf8') : Buffer.from(secret);
  const out = [b, Buffer.from(b.toString('hex')), Buffer.from(b.toString('hex').toUpperCase())];
  if (typeof secret === 'string') out.push(Buffer.from(JSON.stringify(secret).slice(1, -1)));
  for (const enc of ['base64', 'base64url'] as const) {
    for (let off = 0; off < 3; off++) {
      // base64 of a secret that starts `off` bytes into a longer value: skip the chars the prefix touches.
      const s = Buffer.concat([Buffer.alloc(off), b]).toString(enc).replace(/=+$/, '');
      const skip = off === 0 ? 0 : off === 1 ? 2 : 3;
      const core = s.slice(skip, s.length - 2);
      if (core.length >= 12) out.push(Buffer.from(core));
    }
  }
  return out.filter((x) => x.length >= 6);
}

/**
 * Collects the secrets a test used and the places they must not appear, and
 * searches every place for every spelling of every secret at the end.
 */
export class LeakScan {
  private readonly secrets: { label: string; value: Uint8Array | string }[] = [];
  private readonly texts: { label: string; get: () => string[] | string }[] = [{ label: 'error messages', get: () => errorsSeen }];
  private readonly files: { label: string; path: () => string }[] = [];

  secret(label: string, value: Uint8Array | string): void {
    if (typeof value === 'string' ? value.length >= 6 : value.length >= 8) this.secrets.push({ label, value: typeof value === 'string' ? value : new Uint8Array(value) });
  }
  text(label: string, get: () => string[] | string): void {
    this.texts.push({ label, get });
  }
  /** A file (and its -wal/-shm siblings for a database). */
  file(label: string, path: () => string): void {
    this.files.push({ label, path });
  }
  /** Everything a running daemon writes that a secret could reach, and its HSM PIN to look for. */
  daemon(d: RunningDaemon): void {
    this.text('daemon log', () => d.logs);
    this.file('database', () => join(d.dataDir, 'vault.db'));
    this.file('audit log', () => join(d.dataDir, 'audit.log'));
    this.secret('HSM PIN', readFileSync(join(d.dataDir, 'hsm-pin'), 'utf8').trim());
  }
  get secretCount(): number {
    return this.secrets.length;
  }

  /** Every hit as "secret label in place"; empty when nothing leaked. */
  scan(): { hits: string[]; secrets: number; places: number; bytes: number } {
    const places: { label: string; hay: Buffer }[] = [];
    for (const t of this.texts) {
      const v = t.get();
      places.push({ label: t.label, hay: Buffer.from(Array.isArray(v) ? v.join('\n') : v) });
    }
    for (const f of this.files) {
      const p = f.path();
      for (const q of [p, `${p}-wal`, `${p}-shm`, `${p}-journal`]) if (existsSync(q)) places.push({ label: `${f.label}:${q.slice(q.lastIndexOf('/') + 1)}`, hay: readFileSync(q) });
    }
    const needles = this.secrets.map((s) => ({ label: s.label, all: spellings(s.value) }));
    const hits: string[] = [];
    for (const pl of places) for (const n of needles) if (n.all.some((x) => pl.hay.includes(x))) hits.push(`${n.label} in ${pl.label}`);
    return { hits, secrets: this.secrets.length, places: places.length, bytes: places.reduce((a, p) => a + p.hay.length, 0) };
  }
}

// ---- process and socket observation ----------------------------------------------

/** Resident set size of a process in bytes (Linux /proc). */
export function rssOf(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** TCP connections in ESTABLISHED state whose local or remote port is `port` (Linux /proc). */
export function establishedOn(port: number): number {
  let n = 0;
  for (const f of ['/proc/net/tcp', '/proc/net/tcp6']) {
    if (!existsSync(f)) continue;
    for (const line of readFileSync(f, 'utf8').split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols.length < 4 || cols[3] !== '01') continue;
      const lp = parseInt(cols[1]!.split(':')[1]!, 16);
      if (lp === port) n++;
    }
  }
  return n;
}

export async function waitFor(cond: () => boolean | Promise<boolean>, ms: number, step = 50): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, step));
  }
}

// ---- statistics ------------------------------------------------------------------

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.floor(q * (s.length - 1))))]!;
}

/**
 * Two-sided Mann-Whitney U test with the normal approximation (tie-corrected).
 * Returns U, z, the p-value and the common-language effect size
 * P(a > b) + ½P(a = b), which is 0.5 when neither sample tends to be larger.
 */
export function mannWhitney(a: number[], b: number[]): { u: number; z: number; p: number; effect: number } {
  const all = [...a.map((v) => ({ v, g: 0 })), ...b.map((v) => ({ v, g: 1 }))].sort((x, y) => x.v - y.v);
  const ranks = new Array<number>(all.length);
  let tieTerm = 0;
  for (let i = 0; i < all.length; ) {
    let j = i;
    while (j + 1 < all.length && all[j + 1]!.v === all[i]!.v) j++;
    const r = (i + j) / 2 + 1;
    for (let k = i; k <= j; k++) ranks[k] = r;
    const t = j - i + 1;
    tieTerm += t * t * t - t;
    i = j + 1;
  }
  let ra = 0;
  all.forEach((x, i) => {
    if (x.g === 0) ra += ranks[i]!;
  });
  const n1 = a.length;
  const n2 = b.length;
  const u = ra - (n1 * (n1 + 1)) / 2;
  const n = n1 + n2;
  const mu = (n1 * n2) / 2;
  const sigma = Math.sqrt(((n1 * n2) / 12) * (n + 1 - tieTerm / (n * (n - 1))));
  const z = sigma === 0 ? 0 : (u - mu) / sigma;
  return { u, z, p: 2 * (1 - normalCdf(Math.abs(z))), effect: u / (n1 * n2) };
}

function normalCdf(x: number): number {
  // Abramowitz-Stegun 7.1.26 on erf.
  const t = 1 / (1 + 0.3275911 * (x / Math.SQRT2));
  const erf = 1 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-(x * x) / 2);
  return 0.5 * (1 + erf);
}

// ---- a client channel with every knob exposed ---------------------------------------

export type Outer = { outer?: string; ok?: boolean; result?: Record<string, unknown>; code?: string };

/** A channel like the SDK's, but the caller picks counter, clock, ephemeral key and user id. */
export class RawChannel {
  readonly e: Uint8Array;
  readonly epk: Uint8Array;
  readonly keys: ChannelKeys;
  constructor(
    private readonly desc: Descriptor,
    private readonly transport: () => Transport,
    readonly userId: string,
    e: Uint8Array = p256.utils.randomSecretKey(),
  ) {
    this.e = e;
    const hs = clientHandshake(desc.channelKey, e);
    this.epk = hs.ephemeral;
    this.keys = channelKeys(hs.z, hs.ephemeral, desc.vaultId, desc.channelKey);
  }
  get id(): string {
    return toB64(this.keys.id);
  }
  async params(method: string, body: unknown, n: number, o: { ts?: number; userId?: string; epk?: boolean } = {}) {
    const ts = o.ts ?? Date.now();
    const ct = await sealMessage(this.keys.c2s, { dir: 'c2s', channelId: this.keys.id, counter: n, method, userId: this.userId, ts }, body);
    return {
      userId: o.userId ?? this.userId,
      channel: { id: this.id, ...((o.epk ?? n === 0) ? { epk: toB64(this.epk) } : {}), n, ts, ct: toB64(ct) },
    };
  }
  /** Seal, send and open the reply; an outer (relay-visible) error comes back as { outer: code }. */
  async send(method: string, body: unknown, n: number, o: { ts?: number; userId?: string; epk?: boolean } = {}): Promise<Outer> {
    return this.deliver(method, await this.params(method, body, n, o), n);
  }
  async deliver(method: string, p: object, n: number): Promise<Outer> {
    let reply: unknown;
    try {
      reply = await this.transport().call(method, p);
    } catch (e) {
      if (e instanceof VaultError) return { outer: e.code };
      throw e;
    }
    const r = reply as { channel: { n: number; ct: string } };
    if (r.channel.n !== n) throw new Error(`reply for counter ${r.channel.n}, expected ${n}`);
    const h = { dir: 's2c' as const, channelId: this.keys.id, counter: n, method, userId: this.userId, ts: 0 };
    const body = (await openMessage(this.keys.s2c, h, fromB64(r.channel.ct)!)) as { ok: boolean; result?: Record<string, unknown>; error?: { code: string } };
    return body.ok ? { ok: true, result: body.result! } : { ok: false, code: body.error!.code };
  }
}

/**
 * One recovery on a fresh raw channel. `authKey` given: sent as is (a wrong
 * guess needs no OPRF math); otherwise derived from the password.
 */
export async function rawRecover(
  desc: Descriptor,
  transport: () => Transport,
  userId: string,
  password: string,
  o: { authKey?: Uint8Array; blinded?: Uint8Array; onKeys?: (authKey: Uint8Array, envKey: Uint8Array) => void } = {},
): Promise<{ begin: Outer; finish?: Outer }> {
  const ch = new RawChannel(desc, transport, userId);
  const oprf = o.blinded ? undefined : startOprf(desc.vaultId, userId, password);
  const begin = await ch.send('recover.begin', { blinded: toB64(o.blinded ?? oprf!.blinded) }, 0);
  if (!begin.ok) return { begin };
  let authKey = o.authKey;
  if (!authKey) {
    const keys = await finishOprf(oprf!, fromB64(begin.result!.evaluated as string)!, begin.result!.kdf as KdfParams);
    o.onKeys?.(keys.authKey, keys.envKey);
    authKey = keys.authKey;
  }
  const finish = await ch.send('recover.finish', { authKey: toB64(authKey) }, 1);
  return { begin, finish };
}

/**
 * Linearizability of one user's counter under concurrent guesses with exactly
 * one reset (a right password): the committed begins count 1..b before the
 * reset and 1..a after it, so the multiset of "attempts after this begin"
 * must be {1..b} ∪ {1..a} where a is the final count. A lost or doubled
 * update breaks it.
 */
export function counterHistoryProblem(afterEachBegin: number[], finalAttempts: number, resets: number): string | undefined {
  const a = finalAttempts;
  const b = afterEachBegin.length - a;
  if (resets === 0) {
    const want = Array.from({ length: afterEachBegin.length }, (_, i) => i + 1);
    const got = [...afterEachBegin].sort((x, y) => x - y);
    return JSON.stringify(got) === JSON.stringify(want) && a === afterEachBegin.length ? undefined : `begins counted ${JSON.stringify(got)}, final ${a}`;
  }
  if (b < 1) return `final count ${a} leaves no begin before the reset`;
  const want = [...Array.from({ length: b }, (_, i) => i + 1), ...Array.from({ length: a }, (_, i) => i + 1)].sort((x, y) => x - y);
  const got = [...afterEachBegin].sort((x, y) => x - y);
  return JSON.stringify(got) === JSON.stringify(want) ? undefined : `begins counted ${JSON.stringify(got)}, final ${a}: expected ${JSON.stringify(want)}`;
}

/**
 * The test daemon's config for these files: the admin listener on an ephemeral port,
 * so several daemons (parallel test files) never fight over the default 8788.
 */
export function advConfig(extra: { vault?: object; limits?: object } = {}): object {
  return {
    ...TEST_CONFIG,
    admin: { host: '127.0.0.1', port: 0 },
    vault: { ...TEST_CONFIG.vault, ...(extra.vault ?? {}) },
    limits: { ...TEST_CONFIG.limits, ...(extra.limits ?? {}) },
  };
}
