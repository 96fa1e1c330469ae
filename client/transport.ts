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
  /** `ws://` (loopback only) or `wss://` URL of the vault. */
  url: string;
  /** Tenant JWT, sent as `Authorization: Bearer <token>` on the upgrade. */
  token?: string;
  /** Per-call timeout in ms. Default 30 000. */
  timeoutMs?: number;
  /** WebSocket implementation; default: the `ws` package (Node). */
  WebSocket?: WebSocketCtor;
}

const OPEN = 1;
/** Vault frame limit (docs/RPC.md); a larger reply means something is wrong. */
const MAX_FRAME = 64 * 1024;
const CLOSE_TOKEN_EXPIRED = 4401;
const CLOSE_TOO_BIG = 1009;

/** Every code a VaultError may carry, to refuse inventing codes from the wire. */
const KNOWN_CODES = new Set<string>(Object.values(ErrorCodes));

/** A vault we cannot reach or that stopped answering. After a timeout the request's fate is unknown. */
export function unreachable(why: string, extra: Record<string, string | number | boolean> = {}): VaultError {
  return new VaultError(ErrorCodes.VAULT_UNREACHABLE, `vault unreachable: ${why}`, { unreachable: true, ...extra });
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
  return unreachable(`connection closed (code ${code})`);
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

  constructor(private readonly o: WebSocketTransportOptions) {
    if (!/^wss?:\/\//i.test(o.url)) throw new VaultError(ErrorCodes.BAD_REQUEST, 'vault URL must start with ws:// or wss://');
    this.timeoutMs = o.timeoutMs ?? 30_000;
  }

  async call(method: string, params: object): Promise<unknown> {
    const ws = await this.connect();
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
        this.settle(id)?.reject(unreachable(e instanceof Error ? e.message : 'send failed'));
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
        reject(unreachable(`no connection within ${this.timeoutMs} ms`, { timeout: true }));
        ws.close();
      }, this.timeoutMs);
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
        void this.socket?.then((s) => {
          if (s === ws) this.socket = undefined;
        }, () => {});
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
