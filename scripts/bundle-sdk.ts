// Bundles the client SDK for browsers: one ES module, no Node polyfills.
//
//   npm run bundle:sdk        → dist/sdk/bkv-sdk.js (+ .map)
//
// The SDK claims to run in browsers on WebCrypto alone. esbuild on its own
// would not hold it to that: a package's `browser` field or a polyfill
// package named like a builtin (`buffer`, `events`, `crypto`...) would slip
// Node shims in. So the plugin below refuses every `node:` or builtin import
// anywhere in the graph and names the import chain that reached it.
//
// `ws` is the one Node-only package the SDK knows: client/transport.ts loads it
// with a dynamic import only when the caller passes no WebSocket constructor,
// and a page always passes its native WebSocket (a browser cannot use `ws`).
// It stays external (the bundle keeps a bare `import("ws")` that a page never
// reaches); a static import of it, or one from any other file, fails the build.
import { builtinModules } from 'node:module';
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname, relative, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { build, type Plugin } from 'esbuild';

export const ROOT = resolve(import.meta.dirname, '..');
export const SDK_ENTRY = resolve(ROOT, 'client/browser.ts');
export const SDK_OUTFILE = resolve(ROOT, 'dist/sdk/bkv-sdk.js');
const TRANSPORT = resolve(ROOT, 'client/transport.ts');

const BUILTINS = new Set(builtinModules.filter((m) => !m.startsWith('_')));

/** `node:x`, or a bare name (or subpath) that Node resolves to a builtin: `crypto`, `fs/promises`. */
export function isNodeBuiltin(spec: string): boolean {
  return spec.startsWith('node:') || BUILTINS.has(spec) || BUILTINS.has(spec.split('/')[0]!);
}

const show = (p: string) => (p.startsWith('/') ? relative(ROOT, p) : p);

/** Fails the build on any Node builtin in the graph, and on `ws` anywhere but transport.ts's lazy import. */
export function browserOnly(): Plugin {
  return {
    name: 'browser-only',
    setup(b) {
      // file → the file that first imported it, to print the chain to an offending import.
      const parent = new Map<string, string>();
      const chain = (importer: string, spec: string) => {
        const seen: string[] = [spec];
        for (let f: string | undefined = importer; f && seen.length < 50; f = parent.get(f)) seen.unshift(show(f));
        return seen.join(' → ');
      };
      const inner = Symbol('browser-only: resolving');
      b.onResolve({ filter: /.*/ }, async (args) => {
        if (args.pluginData === inner || args.kind === 'entry-point') return undefined;
        const spec = args.path;
        if (isNodeBuiltin(spec)) {
          return {
            errors: [
              {
                text: `"${spec}" is a Node builtin; the browser SDK must not import it (no polyfills). Import chain: ${chain(args.importer, spec)}`,
              },
            ],
          };
        }
        if (spec === 'ws' || spec.startsWith('ws/')) {
          if (args.kind === 'dynamic-import' && args.importer === TRANSPORT) return { path: spec, external: true };
          return {
            errors: [
              {
                text: `"${spec}" is Node-only; only client/transport.ts may load it, lazily (await import('ws')), for callers that pass no WebSocket. Import chain: ${chain(args.importer, spec)}`,
              },
            ],
          };
        }
        const r = await b.resolve(spec, { kind: args.kind, importer: args.importer, resolveDir: args.resolveDir, pluginData: inner });
        if (r.errors.length) return { errors: r.errors };
        if (!parent.has(r.path)) parent.set(r.path, args.importer);
        return { path: r.path, namespace: r.namespace, external: r.external, sideEffects: r.sideEffects, suffix: r.suffix };
      });
    },
  };
}

export interface BundleOptions {
  /** Entry module; default client/browser.ts. */
  entry?: string;
  /** Source text to bundle instead, resolved as if it sat in client/ (tests plant imports this way). */
  source?: string;
  /** Write the bundle (and a source map) here; otherwise it is only returned. */
  outfile?: string;
}

export interface Bundle {
  code: string;
  /** Every input file, relative to the repository root. */
  inputs: string[];
  /** Imports left in the bundle (only `ws`, dynamic). */
  externals: { path: string; kind: string }[];
}

/** Rejects with esbuild's error (message names the offending import and its chain) on a violation. */
export async function bundleSdk(o: BundleOptions = {}): Promise<Bundle> {
  if (o.outfile) mkdirSync(dirname(o.outfile), { recursive: true });
  const r = await build({
    ...(o.source !== undefined
      ? { stdin: { contents: o.source, resolveDir: resolve(ROOT, 'client'), sourcefile: '<planted>.ts', loader: 'ts' as const } }
      : { entryPoints: [o.entry ?? SDK_ENTRY] }),
    bundle: true,
    platform: 'browser',
    format: 'esm',
    target: 'es2022',
    absWorkingDir: ROOT,
    plugins: [browserOnly()],
    metafile: true,
    logLevel: 'silent',
    legalComments: 'none',
    ...(o.outfile ? { outfile: o.outfile, sourcemap: true, write: true } : { write: false }),
  });
  const [, out] = Object.entries(r.metafile.outputs).find(([path]) => !path.endsWith('.map'))!;
  const code = o.outfile ? readFileSync(o.outfile, 'utf8') : r.outputFiles![0]!.text;
  return {
    code,
    inputs: Object.keys(r.metafile.inputs),
    externals: out.imports.filter((i) => i.external).map((i) => ({ path: i.path, kind: i.kind })),
  };
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  bundleSdk({ outfile: SDK_OUTFILE }).then(
    (b) => console.log(`${show(SDK_OUTFILE)}: ${b.code.length} bytes from ${b.inputs.length} files`),
    (e: Error) => {
      console.error(`bundle:sdk failed\n${e.message}`);
      process.exit(1);
    },
  );
}
