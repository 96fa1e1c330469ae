// Rollback protection and crypto-shredding against a real SoftHSM2 token and
// real SQLite files: the HSM anchor, not the disk, decides what is current.
import { describe, it, expect, afterEach, vi } from 'vitest';
import { copyFileSync, existsSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { tempVault, type TestVault } from '../helpers/vault.js';
import { enroll, recover } from '../helpers/flows.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { sealAad } from '../../protocol/record.js';
import { codeOf } from '../helpers/codes.js';
import { bucketOf } from '../../vault/core/state-hash.js';
import { SCHEMA_VERSION } from '../../vault/store/db.js';

const open: TestVault[] = [];
afterEach(() => {
  for (const t of open.splice(0)) t.close();
});

async function vault(): Promise<TestVault> {
  const t = await tempVault();
  open.push(t);
  return t;
}

const key = () => new Uint8Array(randomBytes(32));

/** A hot copy of the database as an operator's backup would take it: the file and its WAL. */
function snapshot(t: TestVault): string {
  const dir = `${t.dbPath}.snap-${randomBytes(3).toString('hex')}`;
  copyFileSync(t.dbPath, `${dir}.db`);
  if (existsSync(`${t.dbPath}-wal`)) copyFileSync(`${t.dbPath}-wal`, `${dir}.db-wal`);
  return dir;
}

/** Stop the vault, put the snapshot back in place of the live database. */
function restore(t: TestVault, snap: string): void {
  t.stop();
  for (const f of [t.dbPath, `${t.dbPath}-wal`, `${t.dbPath}-shm`]) rmSync(f, { force: true });
  copyFileSync(`${snap}.db`, t.dbPath);
  if (existsSync(`${snap}.db-wal`)) copyFileSync(`${snap}.db-wal`, `${t.dbPath}-wal`);
}

function readRow(path: string, userId: string): Record<string, unknown> {
  const db = new Database(path, { readonly: true });
  try {
    return db.prepare('SELECT * FROM records WHERE user_id = ?').get(userId) as Record<string, unknown>;
  } finally {
    db.close();
  }
}

/** Write one old row into the (closed) newer database, as a row-level restore would. */
function writeRow(path: string, row: Record<string, unknown>): void {
  const db = new Database(path);
  try {
    const cols = Object.keys(row);
    db.prepare(`INSERT OR REPLACE INTO records (${cols.join(',')}) VALUES (${cols.map((c) => '@' + c).join(',')})`).run(row);
  } finally {
    db.close();
  }
}

describe('whole-database rollback', () => {
  it('a restored copy taken at 0 attempts does not give 10 attempts back after 5 were spent', async () => {
    const t = await vault();
    await enroll(t.vault, 'alice', 'pw', key());
    const snap = snapshot(t);
    for (let i = 0; i < 5; i++) await recover(t.vault, 'alice', 'wrong');
    expect(t.vault.status('alice').attemptsLeft).toBe(5);
    restore(t, snap);
    expect(await codeOf(t.reopen())).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    expect(t.logs.some((l) => l.includes('"level":50') && l.includes('older than the HSM anchor'))).toBe(true);
  });

  it('a record destroyed by lockout is not revived by restoring an older copy', async () => {
    const t = await vault();
    await enroll(t.vault, 'bob', 'pw-bob', key());
    const snap = snapshot(t);
    for (let i = 0; i < 10; i++) await recover(t.vault, 'bob', 'wrong');
    expect(t.vault.status('bob').state).toBe('locked');
    restore(t, snap);
    expect(await codeOf(t.reopen())).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
  });
});

describe('single-row rollback into a newer database', () => {
  it('an old row with fresh attempts is refused, never served', async () => {
    const t = await vault();
    await enroll(t.vault, 'carol', 'pw-carol', key());
    await enroll(t.vault, 'dave', 'pw-dave', key());
    const fresh = readRow(t.dbPath, 'carol');
    for (let i = 0; i < 5; i++) await recover(t.vault, 'carol', 'wrong');
    t.stop();
    writeRow(t.dbPath, fresh);
    await t.reopen();
    expect(await codeOf(recover(t.vault, 'carol', 'pw-carol'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    expect(await codeOf(Promise.resolve().then(() => t.vault.status('carol')))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    // Other users are unaffected.
    expect((await recover(t.vault, 'dave', 'pw-dave')).outcome).toBe('ok');
  });

  it('the row of a destroyed record restored from before the lockout is refused, with or without the password', async () => {
    const t = await vault();
    await enroll(t.vault, 'erin', 'pw-erin', key());
    const alive = readRow(t.dbPath, 'erin');
    for (let i = 0; i < 10; i++) await recover(t.vault, 'erin', 'wrong');
    t.stop();
    writeRow(t.dbPath, alive);
    await t.reopen();
    expect(await codeOf(recover(t.vault, 'erin', 'pw-erin'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    expect(await codeOf(recover(t.vault, 'erin', 'nope'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
  });
});

describe('the leaf column (a read checks its bucket from the index)', () => {
  function edit(t: TestVault, sql: string, ...args: unknown[]): void {
    t.stop();
    const db = new Database(t.dbPath);
    try {
      db.prepare(sql).run(...args);
    } finally {
      db.close();
    }
  }

  it('a row edited under its stored leaf is refused', async () => {
    const t = await vault();
    await enroll(t.vault, 'fay', 'pw-fay', key());
    for (let i = 0; i < 4; i++) await recover(t.vault, 'fay', 'wrong');
    edit(t, 'UPDATE records SET attempts = 0 WHERE user_id = ?', 'fay');
    await t.reopen();
    expect(await codeOf(recover(t.vault, 'fay', 'pw-fay'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
  });

  it('a row edited together with a leaf recomputed to match it is refused', async () => {
    const t = await vault();
    await enroll(t.vault, 'gus', 'pw-gus', key());
    const fresh = readRow(t.dbPath, 'gus');
    for (let i = 0; i < 4; i++) await recover(t.vault, 'gus', 'wrong');
    // The old row with its own (then correct) leaf: self-consistent, but not what the anchor says.
    edit(t, 'UPDATE records SET attempts = ?, leaf = ? WHERE user_id = ?', fresh.attempts, fresh.leaf, 'gus');
    await t.reopen();
    expect(await codeOf(recover(t.vault, 'gus', 'pw-gus'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
  });

  it('a row copied in under a name the anchored state does not have is refused, not served', async () => {
    const t = await vault();
    await enroll(t.vault, 'hal', 'pw-hal', key());
    // hal's row, bucket and leaf included, under the name ivy: ivy's own bucket does not list it.
    edit(
      t,
      `INSERT INTO records SELECT 'ivy', state, generation, attempts, attempt_limit, verifier, sealed, seal_epoch, kdf,
         created_at, updated_at, bucket, leaf FROM records WHERE user_id = ?`,
      'hal',
    );
    await t.reopen();
    expect(await codeOf(Promise.resolve().then(() => t.vault.status('ivy')))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    expect(await codeOf(recover(t.vault, 'ivy', 'pw-hal'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
  });
});

describe('users sharing a state bucket', () => {
  /** One id from each family that land in the same bucket. */
  function sharingABucket(families: string[]): string[] {
    const seen = families.map(() => new Map<number, string>());
    for (let i = 0; ; i++) {
      families.forEach((f, k) => {
        const id = `${f}-${i}`;
        if (!seen[k]!.has(bucketOf(id))) seen[k]!.set(bucketOf(id), id);
      });
      for (const [b, id] of seen[0]!) if (seen.every((m) => m.has(b))) return [id, ...seen.slice(1).map((m) => m.get(b)!)];
    }
  }

  it('are all served, before and after a restart, whatever order they enrolled in', async () => {
    // SQLite orders a bucket's leaves by UTF-8 bytes: a < ｡ (EF BD A1) < 😀 (F0 9F 98 80), while
    // JavaScript's string order puts 😀 (a surrogate pair, D83D) before ｡ (FF61). Ledger.put
    // rehashes the bucket from its cached leaves (core/bucket-cache.ts), so it has to place a
    // new leaf exactly where SQLite does, or the restart's first read refuses the bucket.
    const [emoji, ascii, halfwidth] = sharingABucket(['\u{1F600}', 'a', '\uFF61']);
    const t = await vault();
    for (const id of [emoji!, ascii!, halfwidth!]) await enroll(t.vault, id, `pw-${id}`, key());
    for (const id of [emoji!, ascii!, halfwidth!]) expect((await recover(t.vault, id, `pw-${id}`)).outcome).toBe('ok');
    expect(await recover(t.vault, ascii!, 'wrong')).toMatchObject({ outcome: 'wrong-password' });
    await t.reopen();
    for (const id of [halfwidth!, ascii!, emoji!]) expect((await recover(t.vault, id, `pw-${id}`)).outcome).toBe('ok');
  });
});

describe('checked leaves kept in memory (core/bucket-cache.ts)', () => {
  it('a recovery reads its bucket from SQLite once, not at every step', async () => {
    const t = await vault();
    await enroll(t.vault, 'kim', 'pw-kim', key());
    await t.reopen(); // start with nothing cached
    const reads = vi.spyOn(t.vault.store.records, 'bucketLeaves');
    expect((await recover(t.vault, 'kim', 'pw-kim')).outcome).toBe('ok');
    expect(await recover(t.vault, 'kim', 'wrong')).toMatchObject({ outcome: 'wrong-password' });
    expect(reads.mock.calls.map(([b]) => b)).toEqual([bucketOf('kim')]);
  });

  it('a row restored while the vault runs is refused, though its bucket is cached', async () => {
    const t = await vault();
    await enroll(t.vault, 'lea', 'pw-lea', key());
    const fresh = readRow(t.dbPath, 'lea');
    for (let i = 0; i < 4; i++) await recover(t.vault, 'lea', 'wrong');
    // Old row and its own leaf, written by another connection under the running vault.
    const db = new Database(t.dbPath);
    db.pragma('busy_timeout = 5000');
    db.prepare('UPDATE records SET attempts = ?, leaf = ? WHERE user_id = ?').run(fresh.attempts, fresh.leaf, 'lea');
    db.close();
    expect(await codeOf(recover(t.vault, 'lea', 'pw-lea'))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
    expect(await codeOf(Promise.resolve().then(() => t.vault.status('lea')))).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
  });
});

describe('schema migration 4 (leaf column)', () => {
  it('a database from before it gets every leaf filled in and serves every record', async () => {
    const t = await vault();
    const keys = new Map<string, Uint8Array>();
    for (let i = 0; i < 30; i++) {
      keys.set(`mg-${i}`, key());
      await enroll(t.vault, `mg-${i}`, `pw-mg-${i}`, keys.get(`mg-${i}`)!);
    }
    await recover(t.vault, 'mg-3', 'wrong');
    t.stop();
    // Back to schema 3 exactly: no leaf column, the old bucket index, no tenant namespace (migration 5).
    const db = new Database(t.dbPath);
    db.exec(
      'DROP INDEX records_leaves; ALTER TABLE records DROP COLUMN leaf; CREATE INDEX records_bucket ON records (bucket, user_id); ' +
        'ALTER TABLE tenants DROP COLUMN namespace; PRAGMA user_version = 3;',
    );
    db.close();
    await t.reopen();
    const after = new Database(t.dbPath, { readonly: true });
    expect(after.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    expect((after.prepare('SELECT count(*) AS n FROM records WHERE leaf IS NULL').get() as { n: number }).n).toBe(0);
    expect(after.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records' AND sql IS NOT NULL ORDER BY name").all()).toEqual([
      { name: 'records_epoch' },
      { name: 'records_leaves' },
    ]);
    after.close();
    expect(t.vault.status('mg-3').attemptsLeft).toBe(9);
    for (const [u, k] of keys) {
      const r = await recover(t.vault, u, `pw-${u}`);
      expect(r.outcome === 'ok' && Buffer.from(r.key).equals(Buffer.from(k)), u).toBe(true);
    }
  });
});

describe('seal-epoch rotation', () => {
  it('re-seals live records, skips destroyed ones, destroys the old key; a pre-rotation copy is dead', async () => {
    const t = await vault();
    const keys = new Map<string, Uint8Array>();
    for (let i = 0; i < 40; i++) {
      const k = key();
      keys.set(`u${i}`, k);
      await enroll(t.vault, `u${i}`, `pw${i}`, k);
    }
    await t.vault.delete('u0');
    for (let i = 0; i < 10; i++) await recover(t.vault, 'u1', 'wrong');
    const snap = snapshot(t);
    const oldRow = readRow(t.dbPath, 'u2');
    const progress: number[] = [];
    const r = await t.vault.rotate({ batchSize: 7, onProgress: (done) => progress.push(done) });
    expect(r).toMatchObject({ epoch: 2, resealed: 38, unreadable: 0, destroyedEpochs: [1] });
    expect(progress.length).toBeGreaterThan(4);
    expect(t.vault.keys.epochs()).toEqual([2]);
    for (let i = 2; i < 40; i++) {
      const got = await recover(t.vault, `u${i}`, `pw${i}`);
      expect(got.outcome === 'ok' && Buffer.from(got.key).equals(Buffer.from(keys.get(`u${i}`)!))).toBe(true);
    }
    // Nothing in the old copy unseals: its epoch key is gone from the HSM.
    const aad = sealAad(t.vault.vaultId, 'u2', oldRow.generation as number, 1, new Uint8Array(oldRow.verifier as Buffer));
    expect(await codeOf(t.vault.keys.unseal(1, aad, new Uint8Array(oldRow.sealed as Buffer)))).toBe(ErrorCodes.RECORD_CORRUPT);
    // And the copy as a whole is refused anyway.
    restore(t, snap);
    expect(await codeOf(t.reopen())).toBe(ErrorCodes.STATE_ROLLBACK_DETECTED);
  });

  it('resumes an interrupted rotation after a restart', async () => {
    const t = await vault();
    for (let i = 0; i < 12; i++) await enroll(t.vault, `r${i}`, `pw${i}`, key());
    // Interrupt: the new epoch exists and a few records moved, then the process "dies".
    let calls = 0;
    await expect(
      t.vault.rotate({
        batchSize: 4,
        onProgress: () => {
          if (++calls === 1) throw new Error('simulated crash');
        },
      }),
    ).rejects.toThrow('simulated crash');
    expect(t.vault.keys.epochs()).toEqual([1, 2]);
    await t.reopen();
    expect(t.vault.keys.epochs()).toEqual([1, 2]);
    const r = await t.vault.rotate({ resume: true });
    expect(r.destroyedEpochs).toEqual([1]);
    expect(r.resealed).toBe(8);
    expect(t.vault.keys.epochs()).toEqual([2]);
    for (let i = 0; i < 12; i++) expect((await recover(t.vault, `r${i}`, `pw${i}`)).outcome).toBe('ok');
  });
});

describe('a crash between commit and anchor', () => {
  it('rolls back the unanchored batch at start-up; nothing acknowledged is lost', async () => {
    const t = await vault();
    await enroll(t.vault, 'fay', 'pw-fay', key());
    await recover(t.vault, 'fay', 'wrong'); // acknowledged: 9 left
    // Fault at the HSM seam (the real HSM cannot be made to fail on cue): the anchor
    // write of the next batch never happens, as if the process died right before it.
    const keys = t.vault.keys as unknown as { writeAnchor: (a: unknown) => Promise<void> };
    keys.writeAnchor = async () => {
      throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'simulated crash before the anchor write');
    };
    expect(await codeOf(recover(t.vault, 'fay', 'wrong-again'))).toBe(ErrorCodes.HSM_UNAVAILABLE);
    expect(await codeOf(enroll(t.vault, 'gus', 'pw-gus', key()))).toBe(ErrorCodes.HSM_UNAVAILABLE);
    await t.reopen();
    // The unacknowledged attempt and enrolment are undone; the acknowledged attempt stays.
    expect(t.vault.status('fay').attemptsLeft).toBe(9);
    expect(t.vault.status('gus').state).toBe('absent');
    expect(t.logs.some((l) => l.includes('state.recovered'))).toBe(true);
    expect((await recover(t.vault, 'fay', 'pw-fay')).outcome).toBe('ok');
  });
});

describe('a torn anchor write', () => {
  it('loses only the slot being written; the vault restarts on the other slot and undoes the unacknowledged batch', async () => {
    const t = await vault();
    await enroll(t.vault, 'hal', 'pw-hal', key());
    await recover(t.vault, 'hal', 'wrong'); // acknowledged: 9 left
    // SoftHSM rewrites an object's file in place; a process killed mid-write loses the
    // object. Reproduce that at the seam: destroy the slot being written, then fail.
    // The keys on this thread (hsm/keys.ts on hsm/token-port.ts): the port's token and its anchor slots' handles.
    const keys = t.vault.keys as unknown as {
      port: { token: { destroy(h: Buffer): void }; table: { keys: { anchor: Uint8Array; anchorB: Uint8Array } } };
      anchor: { latest: number };
      writeAnchor: (a: unknown) => Promise<void>;
    };
    keys.writeAnchor = async () => {
      const slots = [keys.port.table.keys.anchor, keys.port.table.keys.anchorB];
      keys.port.token.destroy(Buffer.from(slots[1 - keys.anchor.latest]!));
      throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'simulated crash in the middle of the anchor write');
    };
    expect(await codeOf(recover(t.vault, 'hal', 'wrong-again'))).toBe(ErrorCodes.HSM_UNAVAILABLE);
    await t.reopen();
    expect(t.vault.status('hal').attemptsLeft).toBe(9);
    expect((await recover(t.vault, 'hal', 'pw-hal')).outcome).toBe('ok');
    // Both slots exist again and keep alternating.
    await t.reopen();
    expect(t.vault.status('hal')).toMatchObject({ state: 'active', attemptsLeft: 10 });
  });
});
