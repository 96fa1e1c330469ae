// How the SDK reaches the vault. The SDK only needs `call(method, params)`;
// everything that is JSON-RPC over a WebSocket lives here.
//
// Two deployments:
// - A trusted backend (or the `bkv` CLI) talks to the vault directly with
//   WebSocketTransport and its tenant token.
// - An app in a browser or on a phone must NOT hold the tenant token. Its
//   backend authenticates the user the usual way and relays: the app
//   implements `Transport` itself as a call to its backend (fetch, its own
//   socket, ...), and the backend forwards the JSON-RPC request with its token
//   and returns `result` or the JSON-RPC `error`. Relaying is safe because the
//   channel messages are end-to-end encrypted to the vault (see sdk.ts): the
//   relay sees user ids and ciphertext only. A relay-side Transport should map
//   errors with `rpcErrorToVaultError` so apps see the same VaultError codes.
//
// Node-only bits stay in this file and are loaded lazily: the default socket
// is the `ws` package (browsers' WebSocket cannot send an Authorization
// header), imported only when no constructor is passed in.
import { VaultError, ErrorCodes, type ErrorCode } from '../protocol/errors.js';

export interface Transport {
  /** Send one request; resolve with its `result`, reject with a VaultError. */
  call(method: string, params: object): Promise<unknown>;
  /** Release the connection. Calls still in flight fail; a later call may reconnect. */
  close(): void;
}

/** The subset of the WHATWG WebSocket API used here (also implemented by `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: 'open', fn: () => void): void;
  addEventListener(type: 'message', fn: (ev: { data: unknown }) => void): void;
  addEventListener(type: 'close', fn: (ev: { code: number; reason: string }) => void): void;
  addEventListener(type: 'error', fn: (ev: { message?: string; error?: unknown }) => void): void;
}

/**
 * `new Ctor(url, protocols, options)`: the `ws` package reads `options.headers`;
 * a browser WebSocket ignores the third argument (so it sends no token, see above).
 */
export type WebSocketCtor = new (
  url: string,
  protocols?: string | string[],
  options?: { headers?: Record<string, string>; maxPayload?: number },
) => WebSocketLike;

export interface WebSocketTransportOptions {
  /** `ws://` (loopback only) or `wss://` URL of the vault (one node; see webSocketTransports for several). */
  url: string;
  /** Tenant JWT, sent as `Authorization: Bearer <token>` on the upgrade. */
  token?: string;
  /** Per-call timeout in ms. Default 30 000. */
  timeoutMs?: number;
  /** Time to open the connection, in ms: a node that does not accept is given up on sooner. Default min(timeoutMs, 10 000). */
  connectTimeoutMs?: number;
  /** WebSocket implementation; default: the `ws` package (Node). */
  WebSocket?: WebSocketCtor;
}

const OPEN = 1;
/** Vault frame limit (docs/RPC.md); a larger reply means something is wrong. */
const MAX_FRAME = 64 * 1024;
const CLOSE_TOKEN_EXPIRED = 4401;
const CLOSE_TOO_BIG = 1009;
const CLOSE_GOING_AWAY = 1001;

/** Every code a VaultError may carry, to refuse inventing codes from the wire. */
const KNOWN_CODES = new Set<string>(Object.values(ErrorCodes));

/**
 * A vault we cannot reach or that stopped answering. `detail.sent: false` says
 * the request never left this process (the connection failed first), so the
 * vault did nothing with it; without it, a request that was sent and got no
 * answer (closed, timed out) may or may not have taken effect.
 */
export function unreachable(why: string, extra: Record<string, string | number | boolean> = {}): VaultError {
  return new VaultError(ErrorCodes.VAULT_UNREACHABLE, `vault unreachable: ${why}`, { unreachable: true, ...extra });
}

/** The same error, marked as never sent. */
function notSent(e: unknown): unknown {
  return e instanceof VaultError ? new VaultError(e.code, e.message, { ...e.detail, sent: false }) : e;
}

/** An entry as it may be shown in an error: no user info, query or fragment (a token could hide there). */
function shownUrl(entry: string): string {
  try {
    const u = new URL(entry);
    return `${u.protocol}//${u.host}${u.pathname === '/' ? '' : u.pathname}`;
  } catch {
    const cut = entry.replace(/\/\/[^/]*@/, '//…@').replace(/[?#].*$/, '');
    return cut.length > 80 ? `${cut.slice(0, 80)}…` : cut;
  }
}

/**
 * The vault URLs of one vault: one URL, or the nodes of a cohort as a list or
 * as one comma-separated string (`ws://a:8787,ws://b:8787`). Each entry must be
 * a ws:// or wss:// URL with a host, listed once; an error names the bad entry
 * by its position (`what` names where the list came from).
 */
export function parseVaultUrls(input: string | readonly string[], what = 'vault URL'): string[] {
  const entries = (typeof input === 'string' ? input.split(',') : [...input]).map((e) => (typeof e === 'string' ? e.trim() : ''));
  const bad = (m: string) => new VaultError(ErrorCodes.BAD_REQUEST, m);
  if (entries.length === 1 && entries[0] === '') throw bad(`${what}: no URL given`);
  const n = entries.length;
  const seen = new Map<string, number>();
  return entries.map((entry, i) => {
    const which = n === 1 ? what : `${what} entry ${i + 1} of ${n}`;
    if (entry === '') throw bad(`${which} is empty (a stray comma?)`);
    if (!/^wss?:\/\//i.test(entry)) throw bad(`${which} ("${shownUrl(entry)}") must start with ws:// or wss://`);
    let u: URL;
    try {
      u = new URL(entry);
    } catch {
      throw bad(`${which} ("${shownUrl(entry)}") is not a valid URL`);
    }
    if (!u.hostname) throw bad(`${which} ("${shownUrl(entry)}") has no host`);
    const key = u.href;
    const dup = seen.get(key);
    if (dup !== undefined) throw bad(`${which} ("${shownUrl(entry)}") repeats entry ${dup + 1}`);
    seen.set(key, i);
    return entry;
  });
}

/** One WebSocketTransport per node of a cohort, same options for each (see parseVaultUrls for `urls`). */
export function webSocketTransports(urls: string | readonly string[], o: Omit<WebSocketTransportOptions, 'url'> = {}): WebSocketTransport[] {
  return parseVaultUrls(urls).map((url) => new WebSocketTransport({ ...o, url }));
}

/** JSON-RPC integer codes, for errors whose data.code is missing or unknown. */
function codeFromRpcInt(n: unknown): ErrorCode {
  switch (n) {
    case -32700:
    case -32600:
    case -32601:
    case -32602:
      return ErrorCodes.BAD_REQUEST;
    case -32001:
      return ErrorCodes.UNAUTHENTICATED;
    case -32003:
      return ErrorCodes.OVERLOADED;
    default:
      return ErrorCodes.INTERNAL;
  }
}

/** Scalars only: VaultError.detail must stay flat and non-secret. */
function scalars(o: unknown, into: Record<string, string | number | boolean>, skip: string[] = []): void {
  if (!o || typeof o !== 'object') return;
  for (const [k, v] of Object.entries(o as Record<string, unknown>)) {
    if (skip.includes(k)) continue;
    if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') into[k] = v;
  }
}

/**
 * A JSON-RPC `error` object → VaultError(data.code, message, detail). Detail
 * keeps `retryable`, `retryAfterMs`, `attemptsLeft`, `now`, ... whether the
 * vault puts them in `data` or in `data.detail`.
 */
export function rpcErrorToVaultError(err: unknown): VaultError {
  const e = (err && typeof err === 'object' ? err : {}) as { code?: unknown; message?: unknown; data?: unknown };
  const data = (e.data && typeof e.data === 'object' ? e.data : {}) as { code?: unknown; detail?: unknown };
  const code = typeof data.code === 'string' && KNOWN_CODES.has(data.code) ? (data.code as ErrorCode) : codeFromRpcInt(e.code);
  const detail: Record<string, string | number | boolean> = {};
  scalars(data.detail, detail);
  scalars(data, detail, ['code', 'detail']);
  if (typeof data.code === 'string' && data.code !== code) detail.vaultCode = data.code;
  const message = typeof e.message === 'string' && e.message ? e.message : code;
  return new VaultError(code, message, Object.keys(detail).length ? detail : undefined);
}

/** HTTP status of a refused upgrade → error. `ws` reports it only in the error text. */
function upgradeRefused(status: number): VaultError {
  if (status === 401) return new VaultError(ErrorCodes.UNAUTHENTICATED, 'vault refused the token (HTTP 401)');
  if (status === 403) return new VaultError(ErrorCodes.FORBIDDEN, 'vault refused the connection (HTTP 403)');
  if (status === 429) return new VaultError(ErrorCodes.RATE_LIMITED, 'vault is rate limiting connections (HTTP 429)', { retryable: true });
  return unreachable(`HTTP ${status} at WebSocket upgrade`, { status });
}

function connectError(ev: { message?: string; error?: unknown }): VaultError {
  const msg = ev.message ?? (ev.error instanceof Error ? ev.error.message : '') ?? '';
  const m = /Unexpected server response: (\d{3})/.exec(msg);
  if (m) return upgradeRefused(Number(m[1]));
  // Never echo the URL's credentials or the token: the ws error text holds neither.
  return unreachable(msg || 'connection failed');
}

function closeError(code: number): VaultError {
  if (code === CLOSE_TOKEN_EXPIRED) return new VaultError(ErrorCodes.UNAUTHENTICATED, 'vault closed the connection: token expired or revoked');
  if (code === CLOSE_TOO_BIG) return new VaultError(ErrorCodes.PAYLOAD_TOO_LARGE, 'vault closed the connection: frame too large');
  if (code === CLOSE_GOING_AWAY) return unreachable('the vault is shutting down (connection closed, code 1001)', { code });
  return unreachable(`connection closed (code ${code})`, { code });
}

interface Pending {
  resolve(v: unknown): void;
  reject(e: unknown): void;
  timer: ReturnType<typeof setTimeout>;
}

/**
 * JSON-RPC 2.0 over one WebSocket, opened on the first call and again after
 * the vault closed it (it drops idle connections after 60 s).
 */
export class WebSocketTransport implements Transport {
  private socket: Promise<WebSocketLike> | undefined;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private readonly timeoutMs: number;
  private readonly connectTimeoutMs: number;

  constructor(private readonly o: WebSocketTransportOptions) {
    if (!/^wss?:\/\//i.test(o.url)) throw new VaultError(ErrorCodes.BAD_REQUEST, 'vault URL must start with ws:// or wss://');
    this.timeoutMs = o.timeoutMs ?? 30_000;
    this.connectTimeoutMs = o.connectTimeoutMs ?? Math.min(this.timeoutMs, 10_000);
  }

  get url(): string {
    return this.o.url;
  }

  async call(method: string, params: object): Promise<unknown> {
    let ws: WebSocketLike;
    try {
      ws = await this.connect();
      // Closed under us before its close event ran: connect again rather than send into it.
      if (ws.readyState !== OPEN) {
        await this.forget(ws);
        ws = await this.connect();
      }
    } catch (e) {
      // Nothing was sent: the caller may send this request to another node as if never tried.
      throw notSent(e);
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      // A timeout leaves the request's fate unknown (it may have been applied), so it is not marked retryable.
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(unreachable(`no answer to ${method} within ${this.timeoutMs} ms`, { timeout: true }));
      }, this.timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      try {
        ws.send(JSON.stringify({ jsonrpc: '2.0', id, method, params }));
      } catch (e) {
        this.settle(id)?.reject(unreachable(e instanceof Error ? e.message : 'send failed', { sent: false }));
      }
    });
  }

  close(): void {
    const s = this.socket;
    this.socket = undefined;
    this.failAll(unreachable('transport closed'));
    s?.then((ws) => ws.close(1000), () => {});
  }

  private settle(id: number): Pending | undefined {
    const p = this.pending.get(id);
    if (!p) return undefined;
    this.pending.delete(id);
    clearTimeout(p.timer);
    return p;
  }

  /** Drop the cached socket if it is `ws` (and not already a newer one). */
  private async forget(ws: WebSocketLike): Promise<void> {
    const p = this.socket;
    if (p && (await p.catch(() => undefined)) === ws && this.socket === p) this.socket = undefined;
  }

  private failAll(e: VaultError): void {
    for (const id of [...this.pending.keys()]) this.settle(id)?.reject(e);
  }

  private connect(): Promise<WebSocketLike> {
    if (this.socket) return this.socket;
    const p = this.open();
    this.socket = p;
    p.catch(() => {
      if (this.socket === p) this.socket = undefined; // the next call tries again
    });
    return p;
  }

  private async open(): Promise<WebSocketLike> {
    const Ctor = this.o.WebSocket ?? ((await import('ws')).WebSocket as unknown as WebSocketCtor);
    const headers: Record<string, string> = this.o.token ? { Authorization: `Bearer ${this.o.token}` } : {};
    let ws: WebSocketLike;
    try {
      ws = new Ctor(this.o.url, [], { headers, maxPayload: MAX_FRAME });
    } catch (e) {
      throw unreachable(e instanceof Error ? e.message : 'bad URL');
    }
    return new Promise((resolve, reject) => {
      let opened = false;
      const timer = setTimeout(() => {
        reject(unreachable(`no connection within ${this.connectTimeoutMs} ms`, { timeout: true }));
        ws.close();
      }, this.connectTimeoutMs);
      ws.addEventListener('open', () => {
        opened = true;
        clearTimeout(timer);
        resolve(ws);
      });
      ws.addEventListener('error', (ev) => {
        if (opened) return; // a 'close' follows and fails what is pending
        clearTimeout(timer);
        reject(connectError(ev));
      });
      ws.addEventListener('close', (ev) => {
        clearTimeout(timer);
        if (!opened) reject(closeError(ev.code));
        // Forget this socket so the next call reconnects, then fail its calls.
        void this.forget(ws);
        this.failAll(closeError(ev.code));
      });
      ws.addEventListener('message', (ev) => this.onMessage(ev.data));
    });
  }

  private onMessage(data: unknown): void {
    const text = typeof data === 'string' ? data : data instanceof ArrayBuffer || ArrayBuffer.isView(data) ? new TextDecoder().decode(data as ArrayBuffer) : '';
    let msg: { id?: unknown; result?: unknown; error?: unknown };
    try {
      msg = JSON.parse(text);
    } catch {
      return; // not ours to answer; the call times out rather than resolving wrongly
    }
    if (!msg || typeof msg !== 'object' || typeof msg.id !== 'number') return;
    const p = this.settle(msg.id);
    if (!p) return;
    if (msg.error !== undefined) p.reject(rpcErrorToVaultError(msg.error));
    else p.resolve(msg.result);
  }
}
