// Tests drive the compiled daemon and CLI as real processes: build first. Incremental
// (tsconfig.json), so a build with nothing changed costs about a second. Type checks of the
// tests and of protocol/ as a browser sees it are `npm run typecheck`, which ./scripts/test
// runs before the suite: vitest strips types without checking them.
import { execFileSync } from 'node:child_process';
import { resolve } from 'node:path';

export default function setup(): void {
  const root = resolve(import.meta.dirname, '..');
  const tsc = resolve(root, 'node_modules/typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', root], { stdio: 'inherit' });
}
