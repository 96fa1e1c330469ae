// Tests drive the compiled daemon and CLI as real processes: build once first.
// Vitest strips types without checking them, so the tests are type-checked too.
import { execFileSync } from 'node:child_process';
import { resolve } from 'node:path';

export default function setup(): void {
  const root = resolve(import.meta.dirname, '..');
  const tsc = resolve(root, 'node_modules/typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', root], { stdio: 'inherit' });
  execFileSync(process.execPath, [tsc, '-p', resolve(root, 'tsconfig.test.json')], { stdio: 'inherit' });
  // protocol/ as a browser sees it: no Node types (protocol/tsconfig.json).
  execFileSync(process.execPath, [tsc, '-p', resolve(root, 'protocol/tsconfig.json')], { stdio: 'inherit' });
}
