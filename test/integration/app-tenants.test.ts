// vault/app/: the tenant operations (and the rotation choice) the daemon's admin
// listener and offline bkv-admin share, without a daemon or an HSM. A real
// TenantStore on a real SQLite file; the HSM-derived secret is a seam (a hash of
// the same input the HSM would MAC), so a minted token is checked by the real
// Authenticator exactly as the vault checks one.
import { describe, it, expect, beforeEach, afterEach } from 'vitest';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { Store } from '../../vault/store/index.js';
import { Authenticator, tenantSecretInput } from '../../vault/rpc/auth.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { addTenant, mintTenantToken, newestActiveVersion, revokeTenant, type TenantDeps } from '../../vault/app/tenants.js';
import { rotate } from '../../vault/app/rotate.js';
import type { Vault } from '../../vault/core/vault.js';

const vaultId = new Uint8Array(32).fill(7);
/** Stands in for HMAC_hsm(tenant key, input): deterministic, and different per name and version. */
const derive = (input: Uint8Array): Promise<Uint8Array> => Promise.resolve(new Uint8Array(createHash('sha256').update(input).digest()));
const fakeSecret = (name: string, version: number) => derive(tenantSecretInput(vaultId, name, version));
const hex = async (name: string, version: number) => Buffer.from(await fakeSecret(name, version)).toString('hex');

let dir: string;
let store: Store;
let lines: Record<string, unknown>[];
let secretCalls: string[];
let deps: TenantDeps;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'bkv-app-tenants-'));
  store = new Store(join(dir, 'vault.db'));
  lines = [];
  secretCalls = [];
  const log = pino({ level: 'info' }, { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) });
  deps = {
    tenants: store.tenants,
    secretFor: (name, version) => {
      secretCalls.push(`${name}:${version}`);
      return fakeSecret(name, version);
    },
    vaultId,
    tokenMaxLifetimeSec: 3600,
    log,
  };
});
afterEach(() => {
  store.close();
  rmSync(dir, { recursive: true, force: true });
});

const events = (event: string) => lines.filter((l) => l.event === event).map(({ level: _l, time: _t, pid: _p, hostname: _h, ...rest }) => rest);
const states = (name: string) => store.tenants.list().filter((t) => t.name === name).map((t) => `${t.version}:${t.state}`);

async function thrown(p: Promise<unknown>): Promise<VaultError> {
  const e = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(VaultError);
  return e as VaultError;
}

describe('addTenant', () => {
  it('adds version 1, then a new version on each call, with that version\'s secret once, and logs tenant.add', async () => {
    const a = await addTenant(deps, 'acme');
    const b = await addTenant(deps, 'acme');
    expect(a).toEqual({ name: 'acme', version: 1, secret: await hex('acme', 1) });
    expect(b).toEqual({ name: 'acme', version: 2, secret: await hex('acme', 2) });
    expect(a.secret).not.toBe(b.secret);
    expect(states('acme')).toEqual(['1:active', '2:active']);
    expect(events('tenant.add')).toEqual([
      { event: 'tenant.add', tenant: 'acme', version: 1, msg: 'tenant credential added' },
      { event: 'tenant.add', tenant: 'acme', version: 2, msg: 'tenant credential added' },
    ]);
  });

  it('a name the table refuses adds nothing and derives no secret', async () => {
    const e = await thrown(addTenant(deps, 'Not Valid'));
    expect(e.code).toBe(ErrorCodes.BAD_REQUEST);
    expect(store.tenants.list()).toEqual([]);
    expect(secretCalls).toEqual([]);
    expect(events('tenant.add')).toEqual([]);
  });
});

describe('revokeTenant', () => {
  it('one version: only that one, reported to the cut-off with what it closed, and logged', async () => {
    for (let i = 0; i < 3; i++) await addTenant(deps, 'acme');
    const cutOffs: number[][] = [];
    const r = await revokeTenant(deps, 'acme', 2, async (versions) => {
      cutOffs.push(versions);
      // Called after the table changed, not before: the revocation is what it acts on.
      expect(states('acme')).toEqual(['1:active', '2:revoked', '3:active']);
      return 4;
    });
    expect(r).toEqual({ name: 'acme', revoked: 1, versions: [2], connectionsClosed: 4 });
    expect(cutOffs).toEqual([[2]]);
    expect(states('acme')).toEqual(['1:active', '2:revoked', '3:active']);
    expect(events('tenant.revoke')).toEqual([
      { event: 'tenant.revoke', tenant: 'acme', revoked: 1, versions: [2], connectionsClosed: 4, msg: 'tenant credentials revoked' },
    ]);
  });

  it('all versions: every still-active one, and none of another tenant; offline (no cut-off) closes nothing', async () => {
    for (let i = 0; i < 3; i++) await addTenant(deps, 'acme');
    await addTenant(deps, 'other');
    await revokeTenant(deps, 'acme', 1);
    const r = await revokeTenant(deps, 'acme');
    expect(r).toEqual({ name: 'acme', revoked: 2, versions: [2, 3], connectionsClosed: 0 });
    expect(states('acme')).toEqual(['1:revoked', '2:revoked', '3:revoked']);
    expect(states('other')).toEqual(['1:active']);
    expect(events('tenant.revoke').at(-1)).toMatchObject({ tenant: 'acme', revoked: 2, versions: [2, 3], connectionsClosed: 0 });
  });

  it('nothing active to revoke is RECORD_NOT_FOUND, naming the version asked for; nothing is cut off or logged', async () => {
    await addTenant(deps, 'acme');
    let cutOff = 0;
    const count = async () => ++cutOff;
    const unknown = await thrown(revokeTenant(deps, 'nobody', undefined, count));
    expect(unknown.code).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(unknown.message).toBe('no active tenant "nobody"');
    const noVersion = await thrown(revokeTenant(deps, 'acme', 9, count));
    expect(noVersion.code).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(noVersion.message).toBe('no active tenant "acme" version 9');
    await revokeTenant(deps, 'acme');
    const again = await thrown(revokeTenant(deps, 'acme', undefined, count));
    expect(again.code).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(cutOff).toBe(0);
    expect(events('tenant.revoke')).toHaveLength(1);
  });
});

describe('mintTenantToken', () => {
  const auth = () =>
    new Authenticator({ vaultId, isActive: (n, v) => store.tenants.isActive(n, v), deriveSecret: derive, now: () => Date.now(), maxLifetimeSec: 3600 });

  it('mints for the newest active version a token the vault accepts, and logs tenant.token', async () => {
    await addTenant(deps, 'acme');
    await addTenant(deps, 'acme');
    const before = Date.now();
    const r = await mintTenantToken(deps, 'acme', 600, 'backend-7');
    expect(r.name).toBe('acme');
    expect(r.version).toBe(2);
    const exp = Date.parse(r.expiresAt);
    expect(exp).toBeGreaterThanOrEqual(before + 600_000);
    expect(exp).toBeLessThanOrEqual(Date.now() + 600_000);
    const id = await auth().verify(r.token);
    expect(id).toMatchObject({ tenant: 'acme', version: 2, sub: 'backend-7' });
    expect(events('tenant.token')).toEqual([{ event: 'tenant.token', tenant: 'acme', version: 2, ttlSec: 600, msg: 'tenant token minted' }]);
  });

  it('skips a revoked newest version; once revoked, that token is refused', async () => {
    await addTenant(deps, 'acme');
    await addTenant(deps, 'acme');
    const t2 = await mintTenantToken(deps, 'acme', 600);
    await revokeTenant(deps, 'acme', 2);
    const r = await mintTenantToken(deps, 'acme', 600);
    expect(r.version).toBe(1);
    expect((await auth().verify(r.token)).version).toBe(1);
    await expect(auth().verify(t2.token)).rejects.toMatchObject({ code: ErrorCodes.UNAUTHENTICATED });
  });

  it('refuses a ttl over the maximum (BAD_REQUEST) before deriving anything; exactly the maximum is fine', async () => {
    await addTenant(deps, 'acme');
    secretCalls.length = 0;
    const e = await thrown(mintTenantToken(deps, 'acme', 3601));
    expect(e.code).toBe(ErrorCodes.BAD_REQUEST);
    expect(e.message).toContain('limits.tokenMaxLifetimeSec (3600 s)');
    expect(secretCalls).toEqual([]);
    expect(events('tenant.token')).toEqual([]);
    expect((await mintTenantToken(deps, 'acme', 3600)).version).toBe(1);
  });

  it('no active version is RECORD_NOT_FOUND, and mints nothing', async () => {
    const unknown = await thrown(mintTenantToken(deps, 'nobody', 600));
    expect(unknown.code).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(unknown.message).toBe('no active tenant "nobody"');
    await addTenant(deps, 'acme');
    await revokeTenant(deps, 'acme');
    secretCalls.length = 0;
    expect((await thrown(mintTenantToken(deps, 'acme', 600))).code).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(secretCalls).toEqual([]);
    expect(events('tenant.token')).toEqual([]);
  });
});

describe('newestActiveVersion', () => {
  it('the highest active version of that name only, 0 when none', async () => {
    for (let i = 0; i < 3; i++) await addTenant(deps, 'acme');
    for (let i = 0; i < 5; i++) await addTenant(deps, 'other');
    await revokeTenant(deps, 'acme', 3);
    expect(newestActiveVersion(store.tenants.list(), 'acme')).toBe(2);
    expect(newestActiveVersion(store.tenants.list(), 'other')).toBe(5);
    expect(newestActiveVersion(store.tenants.list(), 'nobody')).toBe(0);
    await revokeTenant(deps, 'acme');
    expect(newestActiveVersion(store.tenants.list(), 'acme')).toBe(0);
  });
});

describe('rotate', () => {
  const fakeVault = () => {
    const calls: { kind: string; opts: Record<string, unknown> }[] = [];
    const result = { epoch: 2, resealed: 0, unreadable: 0, destroyedEpochs: [1] };
    const v = {
      rotate: (opts: Record<string, unknown>) => (calls.push({ kind: 'single', opts }), Promise.resolve(result)),
      rotateCohort: (opts: Record<string, unknown>) => (calls.push({ kind: 'cohort', opts }), Promise.resolve({ ...result, destroyedOn: [], pendingNodes: [] })),
    };
    return { vault: v as unknown as Pick<Vault, 'rotate' | 'rotateCohort'>, calls };
  };
  const progress = () => undefined;

  it('a single node rotates with its batch size; a cohort wait means nothing to it', async () => {
    const { vault, calls } = fakeVault();
    await rotate(vault, { resume: true, batchSize: 10, waitSec: 5 }, progress, false);
    expect(calls).toEqual([{ kind: 'single', opts: { resume: true, batchSize: 10, onProgress: progress } }]);
  });

  it('a cohort node rotates across the cohort, waiting waitSec (in ms); a batch size means nothing to it', async () => {
    const { vault, calls } = fakeVault();
    await rotate(vault, { resume: false, batchSize: 10, waitSec: 5 }, progress, true);
    expect(calls).toEqual([{ kind: 'cohort', opts: { resume: false, waitMs: 5000, onProgress: progress } }]);
  });
});
