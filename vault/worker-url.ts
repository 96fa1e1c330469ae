// Where a worker thread's script is: compiled, beside the module that starts it.
// Run from TypeScript sources (vitest), there is no compiled sibling, so the
// copy under dist/ is used; the test setup builds it first.
import { existsSync } from 'node:fs';
import { dirname, relative, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const vaultDir = dirname(fileURLToPath(import.meta.url));

/** `file` beside the module at `moduleUrl` (its `import.meta.url`), or its compiled copy. */
export function workerUrl(moduleUrl: string, file: string): URL {
  const here = dirname(fileURLToPath(moduleUrl));
  const sibling = resolve(here, file);
  if (existsSync(sibling)) return pathToFileURL(sibling);
  return pathToFileURL(resolve(vaultDir, '../dist/vault', relative(vaultDir, here), file));
}
