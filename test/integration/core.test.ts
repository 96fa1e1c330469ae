// Vault core against a real SoftHSM2 token and a real SQLite file.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { readFileSync, existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { tempVault, type TestVault } from '../helpers/vault.js';
import { CALLER, enroll, recover, beginOnly, secretsSeen } from '../helpers/flows.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { utf8 } from '../../protocol/bytes.js';
import { codeOf } from '../helpers/codes.js';

let t: TestVault;
beforeAll(async () => {
  t = await tempVault();
});
afterAll(() => t.close());

const key = () => new Uint8Array(randomBytes(32));

function row(userId: string): Record<string, unknown> | undefined {
  const db = new Database(t.dbPath, { readonly: true });
  try {
    return db.prepare('SELECT * FROM records WHERE user_id = ?').get(userId) as Record<string, unknown> | undefined;
  } finally {
    db.close();
  }
}

function corrupt(userId: string, set: string, ...args: unknown[]): void {
  const db = new Database(t.dbPath);
  try {
    db.prepare(`UPDATE records SET ${set} WHERE user_id = ?`).run(...args, userId);
  } finally {
    db.close();
  }
}

describe('enrol and recover', () => {
  it('returns the exact key for the right password', async () => {
    const k = key();
    const e = await enroll(t.vault, 'alice', 'correct horse battery staple', k);
    expect(e.generation).toBe(1);
    const r = await recover(t.vault, 'alice', 'correct horse battery staple');
    expect(r.outcome).toBe('ok');
    expect(r.outcome === 'ok' && Buffer.from(r.key).equals(Buffer.from(k))).toBe(true);
  });

  it('never writes the key, the password or authKey to the database or the logs', async () => {
    const password = 'leak-canary-' + randomBytes(8).toString('hex');
    await enroll(t.vault, 'leaky', password, key());
    await recover(t.vault, 'leaky', password);
    await recover(t.vault, 'leaky', password + 'x');
    t.vault.store.close();
    const files = [t.dbPath, t.dbPath + '-wal'].filter(existsSync).map((f) => readFileSync(f));
    const logs = Buffer.from(t.logs.join('\n'));
    const needles = [utf8(password), ...secretsSeen].flatMap((s) => {
      const b = Buffer.from(s);
      return [b, Buffer.from(b.toString('hex')), Buffer.from(b.toString('base64')), Buffer.from(b.toString('base64url'))];
    });
    expect(needles.length).toBeGreaterThan(8);
    for (const hay of [...files, logs]) for (const n of needles) expect(hay.includes(n)).toBe(false);
    await t.reopen();
  });
});

describe('attempt counting', () => {
  it('charges a wrong password one attempt and resets on the right one', async () => {
    await enroll(t.vault, 'bob', 'pw-bob', key());
    expect(await recover(t.vault, 'bob', 'nope')).toEqual({ outcome: 'wrong-password', attemptsLeft: 9 });
    expect(await recover(t.vault, 'bob', 'nope2')).toEqual({ outcome: 'wrong-password', attemptsLeft: 8 });
    expect(t.vault.status('bob').attemptsLeft).toBe(8);
    expect((await recover(t.vault, 'bob', 'pw-bob')).outcome).toBe('ok');
    expect(t.vault.status('bob')).toMatchObject({ state: 'active', attemptsLeft: 10 });
  });

  it('destroys the record at the 10th wrong guess; the right password then gets LOCKED', async () => {
    await enroll(t.vault, 'carol', 'pw-carol', key());
    for (let i = 1; i <= 9; i++) {
      expect(await recover(t.vault, 'carol', `wrong-${i}`)).toEqual({ outcome: 'wrong-password', attemptsLeft: 10 - i });
    }
    expect(await recover(t.vault, 'carol', 'wrong-10')).toEqual({ outcome: 'locked' });
    expect(await codeOf(recover(t.vault, 'carol', 'pw-carol'))).toBe(ErrorCodes.LOCKED);
    const r = row('carol')!;
    expect(r.verifier).toBeNull();
    expect(r.sealed).toBeNull();
    expect(t.vault.status('carol').state).toBe('locked');
  });

  it('honours a per-vault limit', async () => {
    const v3 = await tempVault({ attemptLimit: 3 });
    try {
      await enroll(v3.vault, 'dave', 'pw', key());
      expect(await recover(v3.vault, 'dave', 'a')).toEqual({ outcome: 'wrong-password', attemptsLeft: 2 });
      expect(await recover(v3.vault, 'dave', 'b')).toEqual({ outcome: 'wrong-password', attemptsLeft: 1 });
      expect(await recover(v3.vault, 'dave', 'c')).toEqual({ outcome: 'locked' });
      expect(await codeOf(recover(v3.vault, 'dave', 'pw'))).toBe(ErrorCodes.LOCKED);
    } finally {
      v3.close();
    }
  });

  it('charges an abandoned recovery, and destroys at the limit once the last one expires', async () => {
    await enroll(t.vault, 'erin', 'pw-erin', key());
    for (let i = 0; i < 10; i++) await beginOnly(t.vault, 'erin', 'whatever');
    expect(t.vault.status('erin').attemptsLeft).toBe(0);
    // All ten guesses are still in flight: more begins are refused, the record is kept.
    expect(await codeOf(beginOnly(t.vault, 'erin', 'pw-erin'))).toBe(ErrorCodes.LOCKED);
    expect(t.vault.status('erin').state).toBe('active');
    t.clock.now += t.vault.options.sessionTtlMs + 1;
    expect(await t.vault.sweep()).toBe(1);
    expect(t.vault.status('erin').state).toBe('locked');
  });

  it('never lets concurrent guesses exceed the limit', async () => {
    await enroll(t.vault, 'frank', 'pw-frank', key());
    const results = await Promise.allSettled(Array.from({ length: 40 }, () => beginOnly(t.vault, 'frank', 'guess')));
    const counted = results.filter((r) => r.status === 'fulfilled');
    expect(counted.length).toBe(10);
    for (const r of results) if (r.status === 'rejected') expect((r.reason as VaultError).code).toBe(ErrorCodes.LOCKED);
    expect(row('frank')!.attempts).toBe(10);
  });
});

describe('sessions', () => {
  it('refuses a second finish of the same session', async () => {
    await enroll(t.vault, 'gina', 'pw-gina', key());
    const b = await beginOnly(t.vault, 'gina', 'pw-gina');
    expect((await t.vault.recoverFinish(CALLER, b.sessionId, b.authKey)).outcome).toBe('ok');
    expect(await codeOf(t.vault.recoverFinish(CALLER, b.sessionId, b.authKey))).toBe(ErrorCodes.SESSION_NOT_FOUND);
  });

  it('refuses an unknown and an expired session', async () => {
    await enroll(t.vault, 'hank', 'pw-hank', key());
    expect(await codeOf(t.vault.recoverFinish(CALLER, 'A'.repeat(22), new Uint8Array(32)))).toBe(ErrorCodes.SESSION_NOT_FOUND);
    const b = await beginOnly(t.vault, 'hank', 'pw-hank');
    t.clock.now += t.vault.options.sessionTtlMs + 1;
    expect(await codeOf(t.vault.recoverFinish(CALLER, b.sessionId, b.authKey))).toBe(ErrorCodes.SESSION_EXPIRED);
    expect(t.vault.status('hank').attemptsLeft).toBe(9);
  });
});

describe('tampered storage never yields a key', () => {
  it('a row copied from another user is refused as not matching the anchored state', async () => {
    await enroll(t.vault, 'ivan', 'pw-ivan', key());
    await enroll(t.vault, 'judy', 'pw-judy', key());
    const ivan = row('ivan')!;
    corrupt('judy', 'verifier = ?, sealed = ?, generation = ?', ivan.verifier, ivan.sealed, ivan.generation);
    expect(await codeOf(recover(t.vault, 'judy', 'pw-ivan'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    expect(await codeOf(recover(t.vault, 'judy', 'pw-judy'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    expect(t.logs.some((l) => l.includes('"level":50') && l.includes('state.rollback'))).toBe(true);
  });

  it('a tampered verifier, envelope or counter is refused', async () => {
    for (const [user, set, value] of [
      ['kate', 'verifier = ?', Buffer.alloc(32, 7)],
      ['kyle', 'sealed = ?', Buffer.alloc(88, 7)],
      ['kira', 'attempts = ?', 0],
    ] as const) {
      await enroll(t.vault, user, 'pw-' + user, key());
      await recover(t.vault, user, 'wrong');
      corrupt(user, set, value);
      expect(await codeOf(recover(t.vault, user, 'pw-' + user))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
      expect(await codeOf(async () => t.vault.status(user))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    }
  });

  it('below the state check, the verifier and the seal bind user id and generation', async () => {
    const { verifierInput, sealAad } = await import('../../protocol/record.js');
    await enroll(t.vault, 'lena', 'pw-lena', key());
    const b = await beginOnly(t.vault, 'lena', 'pw-lena');
    const r = row('lena')!;
    const verifier = new Uint8Array(r.verifier as Buffer);
    const sealed = new Uint8Array(r.sealed as Buffer);
    const gen = r.generation as number;
    const epoch = r.seal_epoch as number;
    const k = t.vault.keys;
    const id = t.vault.vaultId;
    expect(await k.checkVerifier(verifierInput(id, 'lena', gen, b.authKey), verifier)).toBe(true);
    expect(await k.checkVerifier(verifierInput(id, 'lenb', gen, b.authKey), verifier)).toBe(false);
    expect(await k.checkVerifier(verifierInput(id, 'lena', gen + 1, b.authKey), verifier)).toBe(false);
    expect(await k.unseal(epoch, sealAad(id, 'lena', gen, epoch, verifier), sealed)).not.toBeNull();
    expect(await k.unseal(epoch, sealAad(id, 'lenb', gen, epoch, verifier), sealed)).toBeNull();
    expect(await k.unseal(epoch, sealAad(id, 'lena', gen + 1, epoch, verifier), sealed)).toBeNull();
    const flipped = new Uint8Array(sealed);
    flipped[20]! ^= 1;
    expect(await k.unseal(epoch, sealAad(id, 'lena', gen, epoch, verifier), flipped)).toBeNull();
  });
});

describe('bad input changes nothing', () => {
  it('each malformed request has its own code and leaves the row as it was', async () => {
    await enroll(t.vault, 'mona', 'pw-mona', key());
    const before = row('mona');
    const good = (await beginOnly(t.vault, 'mona', 'pw-mona')).p.blinded;
    await recover(t.vault, 'mona', 'pw-mona'); // reset, then snapshot
    const snap = row('mona');
    const identity = new Uint8Array(65);
    identity[0] = 4;
    const offCurve = new Uint8Array(good);
    offCurve[64]! ^= 1;
    const compressed = new Uint8Array(33);
    compressed[0] = 2;
    const cases: [string, () => Promise<unknown>][] = [
      [ErrorCodes.INVALID_POINT, () => t.vault.recoverBegin(CALLER, 'mona', identity)],
      [ErrorCodes.INVALID_POINT, () => t.vault.recoverBegin(CALLER, 'mona', offCurve)],
      [ErrorCodes.INVALID_LENGTH, () => t.vault.recoverBegin(CALLER, 'mona', compressed)],
      [ErrorCodes.INVALID_LENGTH, () => t.vault.recoverBegin(CALLER, 'mona', good.subarray(0, 64))],
      [ErrorCodes.BAD_REQUEST, () => t.vault.recoverBegin(CALLER, 'mona', 'not bytes')],
      [ErrorCodes.INVALID_USER_ID, () => t.vault.recoverBegin(CALLER, '', good)],
      [ErrorCodes.INVALID_USER_ID, () => t.vault.recoverBegin(CALLER, 42, good)],
      [ErrorCodes.INVALID_USER_ID, () => t.vault.recoverBegin(CALLER, 'x'.repeat(129), good)],
      [ErrorCodes.INVALID_USER_ID, () => t.vault.recoverBegin(CALLER, 'bad\nname', good)],
      [ErrorCodes.RECORD_NOT_FOUND, () => t.vault.recoverBegin(CALLER, 'nobody', good)],
      [ErrorCodes.INVALID_LENGTH, () => t.vault.recoverFinish(CALLER, 'A'.repeat(22), new Uint8Array(31))],
      [ErrorCodes.SESSION_NOT_FOUND, () => t.vault.recoverFinish(CALLER, 'short', new Uint8Array(32))],
      [ErrorCodes.RECORD_EXISTS, () => t.vault.enrollBegin(CALLER, 'mona', good)],
      [ErrorCodes.INVALID_POINT, () => t.vault.enrollBegin(CALLER, 'newbie', identity)],
      [ErrorCodes.RECORD_NOT_FOUND, async () => t.vault.delete('nobody')],
    ];
    for (const [code, call] of cases) {
      expect(await codeOf(call()), code).toBe(code);
      expect(row('mona')).toEqual(snap);
    }
    expect(row('nobody')).toBeUndefined();
    expect(row('newbie')).toBeUndefined();
    expect(before).toBeDefined();
  });

  it('rejects enrolment payloads of the wrong shape without creating a record', async () => {
    const k = key();
    const { startOprf, enrollPayload } = await import('../../client/protocol.js');
    const { TEST_KDF } = await import('../helpers/vault.js');
    const p = startOprf(t.vault.vaultId, 'nina', 'pw-nina');
    const b = await t.vault.enrollBegin(CALLER, 'nina', p.blinded);
    const payload = await enrollPayload(p, b.evaluated, TEST_KDF, k);
    const weak = { alg: 'argon2id', m: 8, t: 1, p: 1 };
    expect(await codeOf(t.vault.enrollFinish(CALLER, b.sessionId, 'nina', { ...payload, kdf: weak }))).toBe(ErrorCodes.INVALID_KDF_PARAMS);
    expect(await codeOf(t.vault.enrollFinish(CALLER, b.sessionId, 'nina', { ...payload, kdf: { alg: 'scrypt' } }))).toBe(ErrorCodes.INVALID_KDF_PARAMS);
    expect(await codeOf(t.vault.enrollFinish(CALLER, b.sessionId, 'nina', { ...payload, envelope: new Uint8Array(59) }))).toBe(ErrorCodes.INVALID_LENGTH);
    expect(await codeOf(t.vault.enrollFinish(CALLER, b.sessionId, 'nina', { ...payload, authKey: new Uint8Array(33) }))).toBe(ErrorCodes.INVALID_LENGTH);
    expect(await codeOf(t.vault.enrollFinish(CALLER, b.sessionId, 'other', payload))).toBe(ErrorCodes.SESSION_NOT_FOUND);
    expect(row('nina')).toBeUndefined();
  });
});

describe('password change and delete', () => {
  it('replaces an active record only with proof of the current password', async () => {
    const k1 = key();
    const k2 = key();
    await enroll(t.vault, 'olga', 'old-pw', k1);
    expect(await codeOf(enroll(t.vault, 'olga', 'attacker-pw', k2))).toBe(ErrorCodes.RECORD_EXISTS);
    const r = await recover(t.vault, 'olga', 'old-pw');
    if (r.outcome !== 'ok') throw new Error('expected ok');
    expect((await enroll(t.vault, 'olga', 'new-pw', k2, r.grant)).generation).toBe(2);
    expect((await recover(t.vault, 'olga', 'old-pw')).outcome).toBe('wrong-password');
    const again = await recover(t.vault, 'olga', 'new-pw');
    expect(again.outcome === 'ok' && Buffer.from(again.key).equals(Buffer.from(k2))).toBe(true);
  });

  it('a grant for one user does not unlock another', async () => {
    await enroll(t.vault, 'paul', 'pw-paul', key());
    await enroll(t.vault, 'quin', 'pw-quin', key());
    const r = await recover(t.vault, 'paul', 'pw-paul');
    if (r.outcome !== 'ok') throw new Error('expected ok');
    expect(await codeOf(enroll(t.vault, 'quin', 'evil', key(), r.grant))).toBe(ErrorCodes.RECORD_EXISTS);
  });

  it('delete destroys the record; re-enrolment starts a new generation', async () => {
    await enroll(t.vault, 'rita', 'pw-rita', key());
    await t.vault.delete('rita');
    expect(t.vault.status('rita').state).toBe('deleted');
    expect(await codeOf(recover(t.vault, 'rita', 'pw-rita'))).toBe(ErrorCodes.RECORD_NOT_FOUND);
    expect(row('rita')!.sealed).toBeNull();
    const k = key();
    expect((await enroll(t.vault, 'rita', 'pw-rita-2', k)).generation).toBe(2);
    const r = await recover(t.vault, 'rita', 'pw-rita-2');
    expect(r.outcome === 'ok' && Buffer.from(r.key).equals(Buffer.from(k))).toBe(true);
  });

  it('lockout survives a restart', async () => {
    await enroll(t.vault, 'sam', 'pw-sam', key());
    for (let i = 0; i < 4; i++) await recover(t.vault, 'sam', 'bad');
    await t.reopen();
    expect(t.vault.status('sam').attemptsLeft).toBe(6);
  });
});
