// An exclusive lock that the kernel holds for this process and drops when it
// ends, however it ends (SIGKILL, OOM, power-off of a container): no stale lock
// to judge, no cleanup by hand. Used for the data folder's single owner
// (admin/lock.ts).
//
// How: a dedicated SQLite file opened with locking_mode=EXCLUSIVE and an
// exclusive transaction kept open. SQLite takes POSIX fcntl() byte-range
// locks on the file for it; they live on the inode, so they exclude other
// processes whatever PID namespace they run in (two containers on one volume,
// same kernel), and a second connection in this process too (SQLite tracks its
// own locks per inode). Chosen over a native flock() package (fs-ext 2.1.1:
// nan addon, node-gyp at install, last release 2024-12) because it adds no
// dependency and no build step to the image: better-sqlite3 is here already.
// (lockfile / proper-lockfile were not candidates: they judge staleness by
// mtime, a guess, not a kernel lock.) On a network file system fcntl locks
// are only as good as its lock manager; the HSM anchor's writer id is the
// guard that does not depend on the host (hsm/anchor.ts).
// Measured on the project's machine (2 cores, under a load average of 11 from
// other test runs): taking the lock costs ~2 ms (open 1.3 ms, BEGIN EXCLUSIVE
// 0.7 ms), being refused 0.15 ms once the file is open. Six starters racing
// after the owner's SIGKILL, 20 rounds: exactly one owner every round
// (test/soak/single-owner-race.test.ts; the default suite runs 8 rounds); the pid-file lock this replaces gave 2 to 6
// owners in 18 of 30 such rounds.
//
// The one POSIX rule to keep: closing ANY descriptor of a file drops every
// fcntl lock this process holds on it. So nothing else in the process may
// open this file (no readFileSync, no copy, no scan of the folder's contents):
// it holds no data and is never read by anyone but SQLite. It is also never
// deleted: a process that opened the old inode could otherwise lock it while
// another creates and locks a new one.
import Database from 'better-sqlite3';
import { chmodSync, lstatSync, type Stats } from 'node:fs';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';

export interface KernelLock {
  readonly file: string;
  release(): void;
}

// Held connections, so that a caller who drops the handle does not lose the lock to the
// garbage collector (better-sqlite3 closes a collected connection): only release() ends it.
const held = new Set<Database.Database>();

const BUSY_WAIT_MS = 500;

/** Take the lock on `file` (created 0600 if missing), or undefined when another holder has it. Waits at most BUSY_WAIT_MS. */
export function tryKernelLock(file: string): KernelLock | undefined {
  // lstat and chmod only: neither opens the file (see the POSIX rule above).
  let st: Stats | undefined;
  try {
    st = lstatSync(file);
  } catch {
    /* created below */
  }
  if (st && !st.isFile()) throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `${file} is not a regular file (a link or something else is in its place)`);
  let db: Database.Database;
  try {
    // Not 0: BEGIN EXCLUSIVE climbs SHARED → RESERVED → PENDING → EXCLUSIVE, and racers'
    // passing SHARED locks can then make every racer fail with SQLITE_BUSY (zero owners,
    // seen in test/integration/single-owner.test.ts under load). With a busy handler SQLite makes the
    // side that would deadlock give up at once and the other wait for it: one owner. A real
    // owner never lets go, so a refusal only comes this much later.
    db = new Database(file, { timeout: BUSY_WAIT_MS });
  } catch (e) {
    throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot open the lock file ${file}: ${(e as Error).message}`);
  }
  try {
    db.pragma('locking_mode = EXCLUSIVE');
    // Takes SQLite's EXCLUSIVE lock at once (no journal, nothing written), held until close.
    db.exec('BEGIN EXCLUSIVE');
  } catch (e) {
    db.close();
    const code = (e as { code?: string }).code ?? '';
    if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') return undefined;
    throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot lock ${file}: ${(e as Error).message}`);
  }
  // SQLite creates it 0644 less the umask; it holds nothing, but nothing in the data folder is for others.
  if (((st?.mode ?? lstatSync(file).mode) & 0o077) !== 0) chmodSync(file, 0o600);
  held.add(db);
  let released = false;
  return {
    file,
    release() {
      if (released) return;
      released = true;
      held.delete(db);
      // Closing ends the (empty) transaction and drops the kernel lock.
      db.close();
    },
  };
}
