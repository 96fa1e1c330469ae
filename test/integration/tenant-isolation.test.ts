// Tenant isolation (issue 14, finding 5; threat model R8 and R6). Before the fix
// every tenant shared one record namespace: any tenant could read the status of,
// spend the attempts of, and delete every other tenant's users, and watch their
// `attemptsLeft` reset after a success. Now a record belongs to (namespace, user
// id), a tenant acts in its own namespace, and reaches another only when
// `tenants.grants` says so. On the real daemon (SoftHSM2, SQLite) and, for the
// migration and the binding, on the real core.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import Database from 'better-sqlite3';
import { CLI, startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { adminApi, type AdminApi } from '../helpers/admin-api.js';
import { RawChannel, RawSocket, advConfig, pinnedKeyOf } from '../helpers/adversarial.js';
import { TEST_KDF, tempVault, type TestVault } from '../helpers/vault.js';
import { enroll, recover } from '../helpers/flows.js';
import { codeOf } from '../helpers/codes.js';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';
import { ErrorCodes } from '../../protocol/errors.js';
import { sealAad as sealAadV1, verifierInput as verifierInputV1 } from '../../protocol/record.js';
import { sealAad, verifierInput } from '../../vault/core/binding.js';
import { LEGACY_NAMESPACE, parseRecordKey, recordKey, resolveNamespace } from '../../vault/core/namespace.js';
import { namespacePolicy } from '../../vault/daemon.js';
import { loadConfig } from '../../vault/config.js';
import { SCHEMA_VERSION } from '../../vault/store/db.js';
import { ChannelTable } from '../../vault/rpc/channels.js';
import { ChannelParams, parse } from '../../vault/rpc/wire.js';
import { startOprf } from '../../client/protocol.js';
import { toB64 } from '../../protocol/bytes.js';
import type { Descriptor } from '../../protocol/descriptor.js';

const key = () => new Uint8Array(randomBytes(32));

describe('tenants on one daemon (R8, R6)', () => {
  let d: RunningDaemon;
  let api: AdminApi;
  let pinned: Uint8Array;
  const transports: WebSocketTransport[] = [];
  const tokens = new Map<string, string>();

  const sdk = (tenant: string, namespace?: string): VaultClient => {
    const transport = new WebSocketTransport({ url: d.url, token: tokens.get(tenant)! });
    transports.push(transport);
    return new VaultClient({ transport, pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0, ...(namespace ? { namespace } : {}) });
  };

  beforeAll(async () => {
    // "auditor" may act in acme's namespace; nobody else is granted anything.
    d = await startDaemon({ config: { ...advConfig(), tenants: { grants: { auditor: ['acme'] } } } });
    api = await adminApi(d);
    pinned = pinnedKeyOf(d);
    for (const t of ['acme', 'globex', 'auditor']) tokens.set(t, (await api.tenant(t)).token);
  });
  afterAll(async () => {
    for (const t of transports) t.close();
    await d?.cleanup();
  });

  it("another tenant's user is absent to a tenant without a grant: no status, no attempt spent, no delete", async () => {
    const acme = sdk('acme');
    const globex = sdk('globex');
    const k = key();
    await acme.enrollPassword('alice', 'pw-alice', k);
    expect(await acme.status('alice')).toMatchObject({ state: 'active', attemptsLeft: 10 });

    // Before the fix: state "active", a guess counted against alice, and her record deleted.
    expect(await globex.status('alice')).toEqual({ userId: 'alice', state: 'absent', attemptsLeft: 0, attemptLimit: 10 });
    expect(await codeOf(globex.recoverWithPassword('alice', 'a guess'))).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(await codeOf(globex.delete('alice'))).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(await acme.status('alice')).toMatchObject({ state: 'active', attemptsLeft: 10 });

    // R6 for other tenants: a wrong guess and then a success (which resets the count) show nothing to globex.
    expect(await codeOf(acme.recoverWithPassword('alice', 'wrong'))).toBe(ErrorCodes.WRONG_PASSWORD);
    expect(await acme.status('alice')).toMatchObject({ attemptsLeft: 9 });
    const seenBefore = await globex.status('alice');
    expect(Buffer.from(await acme.recoverWithPassword('alice', 'pw-alice'))).toEqual(Buffer.from(k));
    expect(await acme.status('alice')).toMatchObject({ attemptsLeft: 10 });
    expect(await globex.status('alice')).toEqual(seenBefore);
  });

  it('one user id under two tenants is two independent records', async () => {
    const acme = sdk('acme');
    const globex = sdk('globex');
    const ka = key();
    const kg = key();
    await acme.enrollPassword('bob', 'pw-acme-bob', ka);
    // Before the fix: RECORD_EXISTS (one shared record).
    await globex.enrollPassword('bob', 'pw-globex-bob', kg);
    expect(Buffer.from(await acme.recoverWithPassword('bob', 'pw-acme-bob'))).toEqual(Buffer.from(ka));
    expect(Buffer.from(await globex.recoverWithPassword('bob', 'pw-globex-bob'))).toEqual(Buffer.from(kg));
    // acme's password is a wrong guess at globex's bob, and counts there only.
    expect(await codeOf(globex.recoverWithPassword('bob', 'pw-acme-bob'))).toBe(ErrorCodes.WRONG_PASSWORD);
    expect(await globex.status('bob')).toMatchObject({ attemptsLeft: 9 });
    expect(await acme.status('bob')).toMatchObject({ attemptsLeft: 10 });
    await globex.delete('bob');
    expect(await globex.status('bob')).toMatchObject({ state: 'deleted' });
    expect(await acme.status('bob')).toMatchObject({ state: 'active' });
    expect(Buffer.from(await acme.recoverWithPassword('bob', 'pw-acme-bob'))).toEqual(Buffer.from(ka));
  });

  it('a granted namespace is reachable with the namespace param; an ungranted one is NAMESPACE_NOT_GRANTED', async () => {
    const k = key();
    await sdk('acme').enrollPassword('carol', 'pw-carol', k);
    const auditorInAcme = sdk('auditor', 'acme');
    expect(await auditorInAcme.status('carol')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    expect(Buffer.from(await auditorInAcme.recoverWithPassword('carol', 'pw-carol'))).toEqual(Buffer.from(k));
    // Without the param, auditor is in its own namespace, where carol does not exist.
    expect(await sdk('auditor').status('carol')).toMatchObject({ state: 'absent' });

    // Not granted: refused before any record is read, the same for a user that exists and one that does not.
    for (const [tenant, ns] of [['globex', 'acme'], ['auditor', 'globex'], ['acme', LEGACY_NAMESPACE]] as const) {
      for (const user of ['carol', 'nobody']) {
        expect(await codeOf(sdk(tenant, ns).status(user)), `${tenant} → ${ns}`).toBe(ErrorCodes.NAMESPACE_NOT_GRANTED);
        expect(await codeOf(sdk(tenant, ns).delete(user))).toBe(ErrorCodes.NAMESPACE_NOT_GRANTED);
        expect(await codeOf(sdk(tenant, ns).recoverWithPassword(user, 'pw-carol'))).toBe(ErrorCodes.NAMESPACE_NOT_GRANTED);
      }
    }
    expect(await sdk('acme').status('carol')).toMatchObject({ state: 'active', attemptsLeft: 10 });

    // On the wire: -32001, not retryable; a namespace that is no tenant name is BAD_REQUEST.
    const s = await RawSocket.open(d.url, tokens.get('globex')!);
    try {
      const a = await s.call('record.status', { userId: 'carol', namespace: 'acme' });
      expect(a.error).toMatchObject({ code: -32001, data: { code: ErrorCodes.NAMESPACE_NOT_GRANTED, retryable: false } });
      const bad = await s.call('record.status', { userId: 'carol', namespace: 'Acme!' });
      expect(bad.error?.data.code).toBe(ErrorCodes.BAD_REQUEST);
      // Naming its own namespace is the same as naming none.
      const own = await s.call('record.status', { userId: 'carol', namespace: 'globex' });
      expect(own.result).toMatchObject({ state: 'absent' });
    } finally {
      s.close();
    }
  });

  it('bkv passes --namespace (and BKV_NAMESPACE) through', async () => {
    await sdk('acme').enrollPassword('erin', 'pw-erin', key());
    const bkv = (args: string[], env: Record<string, string> = {}) =>
      spawnSync(process.execPath, [CLI, 'vault', 'status', '--user', 'erin', ...args], {
        env: { ...d.cliEnv, BKV_TOKEN: tokens.get('auditor')!, ...env },
        encoding: 'utf8',
      });
    expect(bkv([]).stdout).toBe('erin: absent\n');
    expect(bkv(['--namespace', 'acme']).stdout).toBe('erin: active, 10 of 10 attempts left\n');
    expect(bkv([], { BKV_NAMESPACE: 'acme' }).stdout).toBe('erin: active, 10 of 10 attempts left\n');
    const refused = bkv(['--namespace', 'globex']);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toMatch(/not granted/);
  });
});

describe('tenants.grants in the configuration', () => {
  it('is validated with messages naming the field; grants resolve by name only', () => {
    const bad = (grants: unknown) => {
      try {
        loadConfig({ env: {}, overrides: { tenants: { grants } } as Record<string, unknown> });
      } catch (e) {
        return (e as Error).message;
      }
      return 'accepted';
    };
    expect(bad({ 'Not A Tenant': ['acme'] })).toMatch(/tenants\.grants\.Not A Tenant: is not a tenant name/);
    expect(bad({ support: ['acme', 'no spaces'] })).toMatch(/tenants\.grants\.support\.1: must be a tenant name or "_legacy"/);
    expect(bad({ support: 'acme' })).toMatch(/tenants\.grants\.support/);
    expect(() => loadConfig({ env: {}, overrides: { tenants: { isolate: ['ok', 'Not OK'] } } })).toThrow(/tenants\.isolate\.1: is not a tenant name/);
    const c = loadConfig({ env: {}, overrides: { tenants: { grants: { support: ['acme', LEGACY_NAMESPACE] } } } });
    const homes = { home: (t: string) => t, granted: (t: string) => c.tenants.grants[t] ?? [] };
    expect(resolveNamespace(homes, 'support', undefined)).toBe('support');
    expect(resolveNamespace(homes, 'support', 'acme')).toBe('acme');
    expect(resolveNamespace(homes, 'support', LEGACY_NAMESPACE)).toBe(LEGACY_NAMESPACE);
    expect(() => resolveNamespace(homes, 'acme', 'support')).toThrow(/not granted/);
  });
});

describe('migration: records and tenants from before namespaces', () => {
  let t: TestVault;
  afterAll(() => t?.close());

  it('keeps a pre-existing record recoverable by the tenants that existed, and isolates tenants added later', async () => {
    t = await tempVault();
    const k = key();
    // Written in the only namespace there was, by a tenant of that time.
    await enroll(t.vault, 'old-user', 'pw-old', k);
    await recover(t.vault, 'old-user', 'wrong');
    t.vault.store.tenants.add('acme', Date.now());
    t.stop();
    // Back to schema 4 exactly: the tenants table without its namespace column.
    const db = new Database(t.dbPath);
    db.exec('ALTER TABLE tenants DROP COLUMN namespace; PRAGMA user_version = 4;');
    db.close();

    await t.reopen();
    const after = new Database(t.dbPath, { readonly: true });
    expect(after.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    after.close();
    t.vault.store.tenants.add('newco', Date.now());
    // A new credential version of an old tenant keeps its home.
    t.vault.store.tenants.add('acme', Date.now());
    const policy = namespacePolicy(loadConfig({ env: {} }), t.vault.store.tenants);
    expect(policy.home('acme')).toBe(LEGACY_NAMESPACE);
    expect(policy.home('newco')).toBe('newco');
    expect(t.vault.store.tenants.list().map((x) => [x.name, x.version, x.namespace])).toEqual([
      ['acme', 1, LEGACY_NAMESPACE],
      ['acme', 2, LEGACY_NAMESPACE],
      ['newco', 1, 'newco'],
    ]);

    const acme = { tenant: 'acme', namespace: resolveNamespace(policy, 'acme', undefined) };
    const newco = { tenant: 'newco', namespace: resolveNamespace(policy, 'newco', undefined) };
    expect(t.vault.status('old-user', acme)).toMatchObject({ state: 'active', attemptsLeft: 9 });
    expect(t.vault.status('old-user', newco)).toMatchObject({ state: 'absent' });
    expect(await codeOf(t.vault.delete('old-user', newco))).toBe(ErrorCodes.RECORD_NOT_FOUND);
    const r = await recover(t.vault, 'old-user', 'pw-old', acme);
    expect(r.outcome === 'ok' && Buffer.from(r.key).equals(Buffer.from(k))).toBe(true);
    // The legacy row is where it always was: its key is the bare user id.
    expect(t.vault.store.records.get('old-user')?.state).toBe('active');

    // The operator isolates acme (tenants.isolate) and grants it _legacy for its old records.
    const later = namespacePolicy(loadConfig({ env: {}, overrides: { tenants: { isolate: ['acme'], grants: { acme: [LEGACY_NAMESPACE] } } } }), t.vault.store.tenants);
    expect(later.home('acme')).toBe('acme');
    const own = { tenant: 'acme', namespace: resolveNamespace(later, 'acme', undefined) };
    expect(t.vault.status('old-user', own)).toMatchObject({ state: 'absent' });
    const legacy = { tenant: 'acme', namespace: resolveNamespace(later, 'acme', LEGACY_NAMESPACE) };
    expect(t.vault.status('old-user', legacy)).toMatchObject({ state: 'active', attemptsLeft: 10 });
    expect(() => resolveNamespace(namespacePolicy(loadConfig({ env: {}, overrides: { tenants: { isolate: ['acme'] } } }), t.vault.store.tenants), 'acme', LEGACY_NAMESPACE)).toThrow(/not granted/);
  });
});

describe('the namespace is part of the record key and of the verifier/seal binding', () => {
  let t: TestVault;
  afterAll(() => t?.close());

  it('keys are one-to-one and the legacy binding is the protocol one (old records verify)', () => {
    expect(recordKey(LEGACY_NAMESPACE, 'u')).toBe('u');
    expect(recordKey('acme', 'u')).not.toBe(recordKey('globex', 'u'));
    expect(parseRecordKey(recordKey('acme', 'a.b@c'))).toEqual({ namespace: 'acme', userId: 'a.b@c' });
    expect(parseRecordKey('plain')).toEqual({ namespace: LEGACY_NAMESPACE, userId: 'plain' });
    const vid = new Uint8Array(32).fill(7);
    const ak = new Uint8Array(32).fill(9);
    const ver = new Uint8Array(32).fill(3);
    expect(verifierInput(vid, 'u', 1, ak)).toEqual(verifierInputV1(vid, 'u', 1, ak));
    expect(sealAad(vid, 'u', 1, 1, ver)).toEqual(sealAadV1(vid, 'u', 1, 1, ver));
    const inputs = [verifierInput(vid, 'u', 1, ak), verifierInput(vid, recordKey('acme', 'u'), 1, ak), verifierInput(vid, recordKey('globex', 'u'), 1, ak)];
    expect(new Set(inputs.map((x) => Buffer.from(x).toString('hex'))).size).toBe(3);
    const aads = [sealAad(vid, 'u', 1, 1, ver), sealAad(vid, recordKey('acme', 'u'), 1, 1, ver), sealAad(vid, recordKey('globex', 'u'), 1, 1, ver)];
    expect(new Set(aads.map((x) => Buffer.from(x).toString('hex'))).size).toBe(3);
  });

  it("a sealed record moved to another namespace's key does not open, even with the right password", async () => {
    t = await tempVault();
    const acme = { tenant: 'acme', namespace: 'acme' };
    const globex = { tenant: 'globex', namespace: 'globex' };
    const k = key();
    await enroll(t.vault, 'dan', 'pw-dan', k, undefined, acme);
    const row = t.vault.ledger.get(recordKey('acme', 'dan'))!;
    expect(row).toBeDefined();
    // Move it through the ledger (so the anchored state vouches for it): only the binding can stop it now.
    t.vault.ledger.transaction(() => t.vault.ledger.put({ ...row, userId: recordKey('globex', 'dan') }));
    await t.vault.ledger.sync();
    expect(t.vault.status('dan', globex)).toMatchObject({ state: 'active' });
    const moved = await codeOf(recover(t.vault, 'dan', 'pw-dan', globex));
    expect(moved).toBe(ErrorCodes.RECORD_CORRUPT);
    // The original still opens where it belongs.
    const r = await recover(t.vault, 'dan', 'pw-dan', acme);
    expect(r.outcome === 'ok' && Buffer.from(r.key).equals(Buffer.from(k))).toBe(true);
  });
});

describe('a channel belongs to the tenant and namespace that opened it', () => {
  let t: TestVault;
  afterAll(() => t?.close());

  it("another tenant cannot step it (as if unknown); its owner cannot move it to another namespace", async () => {
    t = await tempVault();
    const v = t.vault;
    const acme = { tenant: 'acme', namespace: 'acme' };
    await enroll(v, 'fay', 'pw-fay', key(), undefined, acme);
    const channels = new ChannelTable(v, {
      ttlMs: 120_000,
      freshnessMs: 60_000,
      now: () => t.clock.now,
      maxChannels: 100,
      tenantChannels: 10,
      tenantEnrollChannels: 5,
      tenantClosedChannels: 100,
    });
    const ch = new RawChannel({ vaultId: v.vaultId, channelKey: v.keys.channelPublic } as Descriptor, () => undefined as never, 'fay');
    const step = async (ctx: { tenant: string; namespace: string }, method: 'recover.begin' | 'recover.finish', body: object, n: number) => {
      try {
        await channels.handle(ctx, method, parse(ChannelParams, await ch.params(method, body, n, { ts: t.clock.now })));
        return 'ok';
      } catch (e) {
        return (e as { code: string }).code;
      }
    };
    expect(await step(acme, 'recover.begin', { blinded: toB64(startOprf(v.vaultId, 'fay', 'pw-fay').blinded) }, 0)).toBe('ok');
    expect(v.status('fay', acme).attemptsLeft).toBe(9);
    const finish = { authKey: toB64(new Uint8Array(32)) };
    // Before: any tenant's connection could relay the next message of any channel.
    expect(await step({ tenant: 'globex', namespace: 'globex' }, 'recover.finish', finish, 1)).toBe(ErrorCodes.SESSION_NOT_FOUND);
    expect(await step({ tenant: 'globex', namespace: 'acme' }, 'recover.finish', finish, 1)).toBe(ErrorCodes.SESSION_NOT_FOUND);
    expect(await step({ tenant: 'acme', namespace: LEGACY_NAMESPACE }, 'recover.finish', finish, 1)).toBe(ErrorCodes.BAD_REQUEST);
    // Nothing changed: the owner's finish still goes through (a wrong authKey: the guess counted at begin stands).
    expect(await step(acme, 'recover.finish', finish, 1)).toBe('ok');
    expect(v.status('fay', acme)).toMatchObject({ state: 'active', attemptsLeft: 9 });
  });
});
