// The WebSocket front door. It authenticates the tenant at the upgrade,
// frames JSON-RPC, enforces size, in-flight, rate and idle limits, logs one
// line per request, and drains cleanly on shutdown. It holds no secrets and
// makes no decisions about records.
import { createServer as createHttp, type IncomingMessage, type Server } from 'node:http';
import { createServer as createHttps } from 'node:https';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes, ERRORS, JSONRPC_FRAMING, errorSpec } from '../../protocol/errors.js';
import { userRef } from '../core/vault.js';
import type { Authenticator, TenantIdentity } from './auth.js';
import type { RateLimiter } from './ratelimit.js';
import type { Handler } from './methods.js';
import { corkPerTurn } from './cork.js';

export interface ServerOptions {
  host: string;
  port: number;
  tls?: { cert: string | Buffer; key: string | Buffer };
  maxPayload: number;
  maxInFlight: number;
  /** Open connections per tenant; past it the upgrade gets 429 RATE_LIMITED. */
  tenantConnections: number;
  idleMs: number;
  /** How long shutdown waits for in-flight requests. */
  drainMs: number;
}

export const DEFAULT_SERVER: ServerOptions = {
  host: '127.0.0.1',
  port: 8787,
  maxPayload: 64 * 1024,
  maxInFlight: 64,
  tenantConnections: 1_000,
  idleMs: 300_000,
  drainMs: 10_000,
};

export interface RequestEvent {
  method: string;
  tenant: string;
  outcome: string;
  ms: number;
}

export interface ServerDeps {
  auth: Authenticator;
  limiter: RateLimiter;
  methods: Record<string, Handler>;
  log: Logger;
  now: () => number;
  /** Observers of every finished request (metrics). */
  onRequest?: (e: RequestEvent) => void;
}

/**
 * The JSON-RPC error answer for `e`. The integer and `retryable` come from the
 * error table (protocol/errors.ts); `framing` overrides the integer with one of
 * JSON-RPC's own codes. The error's detail sits beside `code` and `retryable`
 * in `data` (e.g. STALE_MESSAGE's `data.now`) and cannot overwrite them.
 */
function errorBody(id: unknown, e: unknown, framing?: number) {
  const err = e instanceof VaultError ? e : new VaultError(ErrorCodes.INTERNAL, 'internal error');
  const spec = errorSpec(err.code) ?? ERRORS.INTERNAL;
  return {
    jsonrpc: '2.0',
    id: id ?? null,
    error: {
      code: framing ?? spec.jsonrpc,
      message: err.message,
      data: { ...(err.detail ?? {}), code: err.code, retryable: spec.retryable },
    },
  };
}

/** A JSON-RPC id we can echo: JSON-RPC 2.0 answers null when the id cannot be read. */
const readableId = (v: unknown): string | number | null => (typeof v === 'string' || typeof v === 'number' ? v : null);

/**
 * Why `req` is not one JSON-RPC 2.0 request object this server serves, or
 * undefined when it is. Batches (arrays) and notifications (no id) are not served.
 */
function invalidRequest(req: unknown): string | undefined {
  if (Array.isArray(req)) return 'batches are not accepted: send one request object per frame';
  if (typeof req !== 'object' || req === null) return 'not a JSON-RPC 2.0 request object';
  const r = req as { jsonrpc?: unknown; id?: unknown; method?: unknown; params?: unknown };
  if (r.jsonrpc !== '2.0') return 'the "jsonrpc" member must be "2.0"';
  if (typeof r.method !== 'string') return 'the "method" member must be a string';
  if (typeof r.id !== 'string' && typeof r.id !== 'number') return 'the "id" member must be a string or a number (notifications are not served)';
  if (r.params !== undefined && (typeof r.params !== 'object' || r.params === null)) return 'the "params" member must be an object when present';
  return undefined;
}

export interface RunningServer {
  port: number;
  server: Server;
  connections(): number;
  /**
   * Close every connection holding one of these credential versions of `tenant` with
   * 4401, refuse anything more they send, and resolve (with how many there were) once
   * the requests they had in progress have settled (up to drainMs).
   */
  revoke(tenant: string, versions: number[]): Promise<number>;
  /** Stop accepting, let in-flight requests finish (up to drainMs), close every socket. */
  close(): Promise<void>;
}

interface Conn {
  id: TenantIdentity;
  /** Requests of this connection in progress. */
  inFlight: number;
  /** Its credential was revoked: it is being closed and serves nothing more. */
  revoked: boolean;
}

export async function startServer(deps: ServerDeps, opts: ServerOptions): Promise<RunningServer> {
  const isLoopback = ['127.0.0.1', '::1', 'localhost'].includes(opts.host);
  if (!opts.tls && !isLoopback) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `refusing plain ws:// on ${opts.host}: configure TLS or listen on loopback`);
  }
  const server = opts.tls ? createHttps({ cert: opts.tls.cert, key: opts.tls.key }) : createHttp();
  const wss = new WebSocketServer({ noServer: true, maxPayload: opts.maxPayload });
  /** Open connections, with what revocation needs: whose they are, what they have in progress. */
  const sockets = new Map<WebSocket, Conn>();
  /** Connections per tenant, counted from the upgrade's authentication until the socket closes. */
  const perTenant = new Map<string, number>();
  let inFlightTotal = 0;
  let closing = false;

  server.on('request', (_req, res) => {
    res.writeHead(426, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: { code: 'BAD_REQUEST', message: 'this endpoint speaks WebSocket only' } }));
  });

  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const refuse = (status: number, code: string, message: string) => {
      const body = JSON.stringify({ error: { code, message } });
      const text = status === 401 ? 'Unauthorized' : status === 429 ? 'Too Many Requests' : 'Service Unavailable';
      socket.end(
        `HTTP/1.1 ${status} ${text}\r\n` +
          `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
      );
    };
    if (closing) return refuse(503, ErrorCodes.OVERLOADED, 'vault is shutting down');
    const header = req.headers.authorization;
    const token = header?.startsWith('Bearer ') ? header.slice(7).trim() : undefined;
    deps.auth.verify(token).then(
      (id) => {
        // One tenant's connections (each with its timers and buffers) are bounded like its sessions.
        const n = perTenant.get(id.tenant) ?? 0;
        if (n >= opts.tenantConnections) {
          deps.log.warn({ event: 'conn.refused', tenant: id.tenant, reason: 'tenantConnections' }, 'connection refused: tenant at its connection quota');
          return refuse(429, ErrorCodes.RATE_LIMITED, 'too many open connections for this tenant');
        }
        perTenant.set(id.tenant, n + 1);
        // The socket's close ends the count, whether the upgrade completes or not.
        socket.once('close', () => {
          const left = (perTenant.get(id.tenant) ?? 1) - 1;
          if (left > 0) perTenant.set(id.tenant, left);
          else perTenant.delete(id.tenant);
        });
        wss.handleUpgrade(req, socket, head, (ws) => onConnection(ws, id, socket));
      },
      (e: unknown) => {
        deps.log.warn({ event: 'auth.refused', reason: (e as Error).message, remote: req.socket.remoteAddress }, 'connection refused');
        refuse(401, ErrorCodes.UNAUTHENTICATED, e instanceof VaultError ? e.message : 'unauthenticated');
      },
    );
  });

  /** Close with 4401 now; a peer that does not finish the close handshake is cut off after a second. */
  const cutOff = (ws: WebSocket, reason: string) => {
    ws.close(4401, reason);
    setTimeout(() => ws.terminate(), 1000).unref();
  };

  function onConnection(ws: WebSocket, id: TenantIdentity, socket: Duplex): void {
    const conn: Conn = { id, inFlight: 0, revoked: false };
    sockets.set(ws, conn);
    // Revoked while its upgrade was being verified: it never serves.
    if (deps.auth.isRevoked(id)) {
      conn.revoked = true;
      cutOff(ws, 'tenant credential revoked');
    }
    const ctx = Object.freeze({ tenant: id.tenant });
    const cork = corkPerTurn(socket);
    let idle = setTimeout(() => ws.close(1000, 'idle'), opts.idleMs);
    let alive = true;
    const heartbeat = setInterval(() => {
      if (!alive) return ws.terminate();
      alive = false;
      ws.ping();
    }, Math.min(30_000, opts.idleMs));
    ws.on('pong', () => (alive = true));
    ws.on('close', () => {
      sockets.delete(ws);
      clearTimeout(idle);
      clearInterval(heartbeat);
    });
    ws.on('error', (e) => deps.log.debug({ event: 'ws.error', message: e.message }, 'socket error'));
    ws.on('message', (data, isBinary) => {
      clearTimeout(idle);
      idle = setTimeout(() => ws.close(1000, 'idle'), opts.idleMs);
      const started = performance.now();
      let req: unknown;
      const send = (body: object) => {
        if (ws.readyState !== ws.OPEN) return;
        cork();
        ws.send(JSON.stringify(body));
      };
      const done = (method: string, outcome: string, userId?: string) => {
        const ms = Math.round((performance.now() - started) * 100) / 100;
        deps.log.info(
          { event: 'rpc', method, tenant: id.tenant, outcome, ms, ...(userId !== undefined ? { user: userRef(userId) } : {}) },
          'request',
        );
        deps.onRequest?.({ method, tenant: id.tenant, outcome, ms });
      };
      // A binary frame is not a request of this protocol (text frames only): Invalid Request.
      if (isBinary) {
        send(errorBody(null, new VaultError(ErrorCodes.BAD_REQUEST, 'binary frames are not accepted'), JSONRPC_FRAMING.INVALID_REQUEST));
        return done('(unparsed)', ErrorCodes.BAD_REQUEST);
      }
      try {
        req = JSON.parse(data.toString());
      } catch {
        send(errorBody(null, new VaultError(ErrorCodes.BAD_REQUEST, 'frame is not JSON'), JSONRPC_FRAMING.PARSE_ERROR));
        return done('(unparsed)', ErrorCodes.BAD_REQUEST);
      }
      const invalid = invalidRequest(req);
      if (invalid) {
        const echo = typeof req === 'object' && req !== null && !Array.isArray(req) ? readableId((req as { id?: unknown }).id) : null;
        send(errorBody(echo, new VaultError(ErrorCodes.BAD_REQUEST, invalid), JSONRPC_FRAMING.INVALID_REQUEST));
        return done('(invalid)', ErrorCodes.BAD_REQUEST);
      }
      const { id: reqId, method, params } = req as { id: number | string; method: string; params?: unknown };
      const handler = Object.hasOwn(deps.methods, method) ? deps.methods[method] : undefined;
      const fail = (e: unknown, userId?: string) => {
        if (!(e instanceof VaultError)) deps.log.error({ event: 'rpc.internal', method, err: (e as Error)?.message }, 'internal error');
        const body = errorBody(reqId, e);
        send(body);
        done(method, body.error.data.code, userId);
      };
      if (!handler) {
        send(errorBody(reqId, new VaultError(ErrorCodes.BAD_REQUEST, `unknown method ${method.slice(0, 64)}`), JSONRPC_FRAMING.METHOD_NOT_FOUND));
        return done('(unknown)', ErrorCodes.BAD_REQUEST);
      }
      if (closing) return fail(new VaultError(ErrorCodes.OVERLOADED, 'vault is shutting down; retry on another connection'));
      if (id.exp * 1000 + 30_000 < deps.now()) {
        fail(new VaultError(ErrorCodes.UNAUTHENTICATED, 'tenant token expired'));
        return void ws.close(4401, 'token expired');
      }
      // Every request, not only the upgrade: a revoked credential serves nothing more, even
      // on a connection whose close is still under way (one Set lookup).
      if (conn.revoked || deps.auth.isRevoked(id)) {
        conn.revoked = true;
        fail(new VaultError(ErrorCodes.UNAUTHENTICATED, 'tenant credential revoked'));
        return cutOff(ws, 'tenant credential revoked');
      }
      if (conn.inFlight >= opts.maxInFlight) return fail(new VaultError(ErrorCodes.OVERLOADED, 'too many requests in flight on this connection'));
      conn.inFlight++;
      inFlightTotal++;
      let userId: string | undefined;
      handler(params, ctx, (u) => {
        userId = u;
        deps.limiter.take(id.tenant, u);
      })
        .then(
          (r) => {
            send({ jsonrpc: '2.0', id: reqId, result: r.result });
            done(method, r.outcome, r.userId);
          },
          (e) => fail(e, userId),
        )
        .finally(() => {
          conn.inFlight--;
          inFlightTotal--;
        });
    });
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => resolve());
  });
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : opts.port;

  return {
    port,
    server,
    connections: () => sockets.size,
    async revoke(tenant, versions) {
      const hit = [...sockets].filter(([, c]) => c.id.tenant === tenant && versions.includes(c.id.version));
      for (const [ws, c] of hit) {
        c.revoked = true;
        cutOff(ws, 'tenant credential revoked');
      }
      // Answered only once nothing of theirs is still running: after the revoke returns,
      // no request of theirs changes anything.
      const deadline = Date.now() + opts.drainMs;
      while (hit.some(([, c]) => c.inFlight > 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      return hit.length;
    },
    async close() {
      closing = true;
      server.close();
      const deadline = Date.now() + opts.drainMs;
      while (inFlightTotal > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      for (const ws of sockets.keys()) ws.close(1001, 'vault shutting down');
      await new Promise((r) => setTimeout(r, 50));
      for (const ws of sockets.keys()) ws.terminate();
      wss.close();
    },
  };
}
