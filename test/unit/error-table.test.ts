// docs/RPC.md against the code, for the parts a client written from the docs
// alone depends on: the error table (every code's JSON-RPC integer, retryable,
// admin HTTP status and both exit codes) must be protocol/errors.ts's table row by
// row, README's exit codes must be bkv's, and a tenant token made exactly as
// the Tenants section says must be accepted. No daemon: these are documents.
import { describe, it, expect } from 'vitest';
import { createHmac, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ADMIN_EXIT, BKV_EXIT, ERRORS, ErrorCodes, JSONRPC_FRAMING, RETRYABLE, type ErrorCode } from '../../protocol/errors.js';
import { Authenticator } from '../../vault/rpc/auth.js';
import { codeOf } from '../helpers/codes.js';

const ROOT = join(import.meta.dirname, '../..');
const doc = (name: string) => readFileSync(join(ROOT, name), 'utf8');

interface DocRow {
  code: string;
  ints: number[];
  retryable: string;
  http: string;
  bkv: string;
  admin: string;
}

/** The table under "### Errors" whose header starts with `data.code`. */
function errorTable(md: string): DocRow[] {
  const section = md.slice(md.indexOf('### Errors'));
  const lines = section.split('\n');
  const head = lines.findIndex((l) => l.startsWith('| `data.code` |'));
  expect(head, 'docs/RPC.md has the error table under ### Errors').toBeGreaterThan(0);
  const rows: DocRow[] = [];
  for (const line of lines.slice(head + 2)) {
    if (!line.startsWith('|')) break;
    const cells = line.split('|').slice(1, -1).map((c) => c.trim());
    expect(cells.length, line.slice(0, 60)).toBe(7);
    const [code, jsonrpc, retryable, http, bkv, admin] = cells as [string, string, string, string, string, string];
    rows.push({ code: code.replace(/`/g, ''), ints: (jsonrpc.match(/-\d+/g) ?? []).map(Number), retryable, http, bkv, admin });
  }
  return rows;
}

describe('docs/RPC.md error table', () => {
  const rows = errorTable(doc('docs/RPC.md'));

  it('lists every code once, in the order of protocol/errors.ts', () => {
    expect(rows.map((r) => r.code)).toEqual(Object.keys(ERRORS));
    expect(Object.keys(ERRORS).sort()).toEqual(Object.values(ErrorCodes).sort());
  });

  it('gives each code the JSON-RPC integer, retryable, HTTP status and exit codes of the code table', () => {
    // One comparison of all rows, so a drift shows every row that differs.
    const fromDoc = rows.map((r) => ({ code: r.code, jsonrpc: r.ints[0], retryable: r.retryable, http: Number(r.http), bkv: Number(r.bkv), admin: Number(r.admin) }));
    const fromCode = (Object.keys(ERRORS) as ErrorCode[]).map((code) => {
      const s = ERRORS[code];
      return { code, jsonrpc: s.jsonrpc, retryable: String(s.retryable), http: s.http, bkv: s.bkv, admin: s.admin };
    });
    expect(fromDoc).toEqual(fromCode);
  });

  it("names JSON-RPC's own framing codes on BAD_REQUEST's row and nowhere else", () => {
    for (const r of rows) {
      const extra = r.ints.slice(1);
      expect([r.code, extra]).toEqual([r.code, r.code === ErrorCodes.BAD_REQUEST ? Object.values(JSONRPC_FRAMING) : []]);
    }
  });

  it('marks retryable exactly the codes whose answer guarantees nothing changed', () => {
    expect([...RETRYABLE].sort()).toEqual(['HSM_UNAVAILABLE', 'OVERLOADED', 'RATE_LIMITED', 'STORE_UNAVAILABLE']);
  });

  it('uses only the exit codes each command line documents', () => {
    const bkv = new Set<number>(Object.values(BKV_EXIT));
    const admin = new Set<number>(Object.values(ADMIN_EXIT));
    for (const [code, s] of Object.entries(ERRORS)) {
      expect([code, bkv.has(s.bkv), admin.has(s.admin)]).toEqual([code, true, true]);
    }
  });
});

describe("README's bkv exit codes", () => {
  it('are the values of BKV_EXIT, each with its meaning', () => {
    const readme = doc('README.md');
    const para = readme.slice(readme.indexOf('Exit codes: '), readme.indexOf('\n\n', readme.indexOf('Exit codes: ')));
    const listed = new Map<number, string>();
    for (const m of para.replace(/\s+/g, ' ').matchAll(/(\d+) ([^,.]+?)(?=, \d|\.$|, \d+ other|$)/g)) listed.set(Number(m[1]), m[2]!);
    const want: [keyof typeof BKV_EXIT, RegExp][] = [
      ['OK', /^ok$/],
      ['OTHER', /^other$/],
      ['USAGE', /^usage$/],
      ['WRONG_PASSWORD', /^wrong password/],
      ['LOCKED', /^record locked$/],
      ['NO_RECORD', /^no record$/],
      ['UNAVAILABLE', /^vault unreachable$/],
      ['WRONG_KEY', /^wrong 64-digit code$/],
      ['CORRUPTED', /^corrupted or truncated backup$/],
      ['UNAUTHENTICATED', /^bad or expired tenant token$/],
    ];
    expect([...listed.keys()].sort((a, b) => a - b)).toEqual(Object.values(BKV_EXIT).sort((a, b) => a - b));
    for (const [name, meaning] of want) expect([name, listed.get(BKV_EXIT[name])]).toEqual([name, expect.stringMatching(meaning)]);
  });
});

describe('a tenant token made as docs/RPC.md#tenants says', () => {
  const vaultId = new Uint8Array(randomBytes(16));
  const secret = new Uint8Array(randomBytes(32));
  /** What `bkv-admin tenant add` prints. */
  const printed = Buffer.from(secret).toString('hex');
  const auth = new Authenticator({ vaultId, isActive: (n, v) => n === 'acme' && v === 1, deriveSecret: async () => secret, now: Date.now });

  /** A backend's own HS256 JWT, with nothing from the vault's code. */
  function jwt(key: Buffer | string, claims: Record<string, unknown>, header: Record<string, unknown> = { alg: 'HS256', typ: 'JWT', kid: 'acme:1' }): string {
    const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const signingInput = `${b64(header)}.${b64(claims)}`;
    return `${signingInput}.${createHmac('sha256', key).update(signingInput).digest('base64url')}`;
  }
  const now = Math.floor(Date.now() / 1000);
  const aud = Buffer.from(vaultId).toString('hex');

  it('is accepted: the key is the printed hex decoded, aud the vault id in lowercase hex', async () => {
    expect(printed).toMatch(/^[0-9a-f]{64}$/);
    const id = await auth.verify(jwt(Buffer.from(printed, 'hex'), { aud, iat: now, exp: now + 600, sub: 'backend-7' }));
    expect(id).toEqual({ tenant: 'acme', version: 1, exp: now + 600, sub: 'backend-7' });
  });

  it('is refused when the printed string itself is the key, or aud is spelled otherwise', async () => {
    expect(await codeOf(auth.verify(jwt(printed, { aud, iat: now, exp: now + 600 })))).toBe(ErrorCodes.UNAUTHENTICATED);
    await expect(auth.verify(jwt(printed, { aud, iat: now, exp: now + 600 }))).rejects.toThrow(/bad signature/);
    await expect(auth.verify(jwt(Buffer.from(printed, 'hex'), { aud: aud.toUpperCase(), iat: now, exp: now + 600 }))).rejects.toThrow(/audience/);
    await expect(auth.verify(jwt(Buffer.from(printed, 'hex'), { aud: Buffer.from(vaultId).toString('base64url'), iat: now, exp: now + 600 }))).rejects.toThrow(/audience/);
  });
});
