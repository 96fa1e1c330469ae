// lib/: Node-only helpers shared by the daemon (vault/) and the bkv CLI (client/cli.ts).
// Never imported by protocol/ or by the browser SDK.
//
// Writing files without being led elsewhere. writeFileSync and
// createWriteStream follow a symbolic link planted at the path (and truncate a
// planted file they then write into, keeping its owner and mode), so whoever
// can create a name in the folder first gets what the vault or the CLI writes
// there: a PIN, an admin token, a restored backup's plaintext. Every file the
// daemon, bkv-admin and bkv write goes through here instead:
//
//   - new content is written to a fresh file created with O_CREAT|O_EXCL|
//     O_NOFOLLOW (mode 0600 unless said otherwise) under an unpredictable name
//     in the target's folder, then renamed over the target. rename() replaces
//     a link at the target instead of following it, and readers never see a
//     half-written file;
//   - a file that is appended to (the audit log) is opened with O_NOFOLLOW and
//     must be a regular file.
import { closeSync, constants as C, fstatSync, fsyncSync, lstatSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';

const CREATE = C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW;

/** A new, empty file beside `target` that nobody else has opened: the name is random and O_EXCL refuses anything already there. */
export function createTemp(target: string, mode = 0o600): { fd: number; path: string } {
  for (let i = 0; ; i++) {
    const path = join(dirname(target), `.${basename(target)}.${randomBytes(8).toString('hex')}.tmp`);
    try {
      return { fd: openSync(path, CREATE, mode), path };
    } catch (e) {
      // 2^64 names: a collision means someone is guessing; a few retries, then give up loudly.
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || i >= 8) throw e;
    }
  }
}

/** Replace `path` with `data` (mode 0600 by default): temp file, fsync, rename. A link at `path` is replaced, never followed. */
export function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o600): void {
  const { fd, path: tmp } = createTemp(path, mode);
  try {
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    for (let off = 0; off < buf.length; ) off += writeSync(fd, buf, off, buf.length - off);
    fsyncSync(fd);
    closeSync(fd);
    renameSync(tmp, path);
  } catch (e) {
    try {
      closeSync(fd);
    } catch {
      /* closed already */
    }
    rmSync(tmp, { force: true });
    throw e;
  }
}

/** Create `path` empty with `mode` unless something is there; a link or other non-file there is refused. */
export function createIfMissing(path: string, mode = 0o600): void {
  try {
    closeSync(openSync(path, CREATE, mode));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    if (!lstatSync(path).isFile()) throw new Error(`${path} exists but is not a regular file (a link or something else was put there)`);
  }
}

/**
 * Open a regular file without following a link at its last component (ELOOP
 * for a symlink). `flags` as for fs.openSync, numeric. Anything but a regular
 * file (a FIFO, a device) is refused too.
 */
export function openNoFollow(path: string, flags: number, mode = 0o600): number {
  const fd = openSync(path, flags | C.O_NOFOLLOW, mode);
  try {
    if (!fstatSync(fd).isFile()) throw new Error(`${path} is not a regular file`);
    return fd;
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** True when something (a file, a link, even a dangling one) has this name. */
export function lexists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

export const OPEN = { RDWR_CREATE: C.O_RDWR | C.O_CREAT, APPEND: C.O_WRONLY | C.O_APPEND, CREATE_EXCL: CREATE } as const;
