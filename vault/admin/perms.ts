// Is the data folder private? It holds the admin token, the embedded token's
// PIN and keys, the audit log and the database; everything in it is created
// 0600 (folders 0700) under a umask of 077 (main.ts, admin.ts), but a folder
// made by hand, or files from an older version, may be looser. The daemon logs
// what it finds at start (`data.permissions`) and reports it in status;
// `bkv-admin config check` warns about it. It changes nothing by itself.
import { lstatSync, readdirSync } from 'node:fs';
import { join, relative } from 'node:path';

/** Public by design: the key every client pins. */
const PUBLIC = new Set(['vault-key.pub']);

export interface PermissionReport {
  ok: boolean;
  /** Up to 20 entries: "path (mode 0755, want 0700)". */
  problems: string[];
}

/** Folders looser than 0700 and files looser than 0600 under `dataDir` (links are not followed). */
export function dataPermissions(dataDir: string, maxEntries = 10_000): PermissionReport {
  const problems: string[] = [];
  let seen = 0;
  const check = (path: string, depth: number): void => {
    if (seen++ > maxEntries || problems.length >= 20) return;
    let st;
    try {
      st = lstatSync(path);
    } catch {
      return;
    }
    const name = relative(dataDir, path) || '.';
    const mode = st.mode & 0o777;
    const show = (want: number) => problems.push(`${name} (mode 0${mode.toString(8)}, want 0${want.toString(8)})`);
    if (st.isDirectory()) {
      if (mode & 0o077) show(0o700);
      if (depth >= 4) return;
      let entries: string[] = [];
      try {
        entries = readdirSync(path);
      } catch {
        return;
      }
      for (const e of entries) check(join(path, e), depth + 1);
    } else if (st.isFile() && mode & 0o077 && !(depth === 1 && PUBLIC.has(name))) {
      show(0o600);
    }
  };
  check(dataDir, 0);
  return { ok: problems.length === 0, problems };
}
