// bkv-admin's side of the admin listener: find the running daemon of a data
// folder (<data>/admin.json), authenticate with <data>/admin-token, call it.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCodes } from '../../protocol/errors.js';

export class AdminCallError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

export interface DaemonEndpoint {
  url: string;
  token: string;
  pid?: number;
}

/** Node's fetch wraps socket errors: dig out the errno code (ECONNREFUSED …). */
function causeCode(e: unknown): string | undefined {
  let c: unknown = e;
  for (let i = 0; i < 4 && c; i++) {
    const code = (c as { code?: unknown }).code;
    if (typeof code === 'string') return code;
    c = (c as { cause?: unknown }).cause;
  }
  return undefined;
}

/** GET a health endpoint; with the admin token, past the listener's limit for unauthenticated callers. */
export async function ping(url: string, path = '/healthz', timeoutMs = 3000, token?: string): Promise<{ status: number; body: unknown }> {
  const res = await fetch(url + path, { signal: AbortSignal.timeout(timeoutMs), ...(token ? { headers: { authorization: `Bearer ${token}` } } : {}) });
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    /* not JSON */
  }
  return { status: res.status, body };
}

/**
 * The running daemon of `dataDir`, or undefined when none runs (no admin.json,
 * or nothing listens at its address any more). A daemon that accepts the
 * connection but does not answer is an error, not "not running": opening the
 * token beside a live owner is exactly what must not happen.
 */
export async function findDaemon(dataDir: string): Promise<DaemonEndpoint | undefined> {
  const infoFile = join(dataDir, 'admin.json');
  if (!existsSync(infoFile)) return undefined;
  let info: { url?: unknown; pid?: unknown };
  try {
    info = JSON.parse(readFileSync(infoFile, 'utf8')) as typeof info;
  } catch {
    return undefined;
  }
  if (typeof info.url !== 'string') return undefined;
  try {
    await ping(info.url);
  } catch (e) {
    const code = causeCode(e);
    if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EADDRNOTAVAIL') return undefined;
    // VAULT_UNREACHABLE: no answer, so bkv-admin exits 6 (daemon unavailable), as bkv does.
    throw new AdminCallError(
      ErrorCodes.VAULT_UNREACHABLE,
      `a daemon announced itself at ${info.url} (pid ${String(info.pid)}) but does not answer (${code ?? (e as Error).name}); ` +
        'refusing to open the HSM token beside it',
      0,
    );
  }
  let token: string;
  try {
    token = readFileSync(join(dataDir, 'admin-token'), 'utf8').trim();
  } catch (e) {
    throw new AdminCallError('UNAUTHENTICATED', `cannot read ${join(dataDir, 'admin-token')} (${causeCode(e) ?? 'error'}): run bkv-admin as the vault's user`, 0);
  }
  return { url: info.url, token, ...(typeof info.pid === 'number' ? { pid: info.pid } : {}) };
}

async function errorOf(res: Response): Promise<AdminCallError> {
  const text = await res.text();
  try {
    const b = JSON.parse(text) as { error?: { code?: string; message?: string } };
    return new AdminCallError(b.error?.code ?? 'INTERNAL', b.error?.message ?? text, res.status);
  } catch {
    return new AdminCallError('INTERNAL', `HTTP ${res.status}: ${text.slice(0, 200)}`, res.status);
  }
}

export async function adminCall<T>(ep: DaemonEndpoint, method: 'GET' | 'POST', path: string, body?: unknown): Promise<T> {
  const res = await fetch(ep.url + path, {
    method,
    headers: { authorization: `Bearer ${ep.token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  if (!res.ok) throw await errorOf(res);
  return (await res.json()) as T;
}

/** POST and read an NDJSON stream line by line (rotation progress). */
export async function adminStream(ep: DaemonEndpoint, path: string, body: unknown, onLine: (o: Record<string, unknown>) => void): Promise<void> {
  const res = await fetch(ep.url + path, {
    method: 'POST',
    headers: { authorization: `Bearer ${ep.token}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (!res.ok || !res.body) throw await errorOf(res);
  const decoder = new TextDecoder();
  let buf = '';
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += decoder.decode(chunk, { stream: true });
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line) onLine(JSON.parse(line) as Record<string, unknown>);
    }
  }
}
