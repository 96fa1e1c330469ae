// One generic way to put something around every HSM call of a VaultKeys
// (metrics timing, a benchmark's no-op anchor, a test's fault switch) without
// a hand-written forwarding class per use: those drifted whenever VaultKeys
// grew a member. The public points and the epoch queries (synchronous, no HSM
// call) pass through untouched; every asynchronous member goes through `around`.
import type { VaultKeys } from './vault-keys.js';

/** The members that reach the HSM: every asynchronous one, ping and close included. */
export type KeysOp = {
  [K in keyof VaultKeys]: VaultKeys[K] extends (...a: never[]) => Promise<unknown> ? K : never;
}[keyof VaultKeys];

/** Runs one call (`call()` forwards it to the inner keys) and answers in its place. */
export type Around = (op: KeysOp, call: () => Promise<unknown>, args: readonly unknown[]) => Promise<unknown>;

// A Record so that the type check fails here when VaultKeys gains an HSM call this list lacks.
const OPS: Record<KeysOp, true> = {
  oprfEvaluate: true,
  channelAgree: true,
  makeVerifier: true,
  checkVerifier: true,
  seal: true,
  unseal: true,
  sign: true,
  tenantSecret: true,
  random: true,
  readAnchor: true,
  writeAnchor: true,
  addEpoch: true,
  destroyEpoch: true,
  adoptEpoch: true,
  ping: true,
  close: true,
};

/** `inner` with `around` wrapped about each HSM call. `around` must answer with what the op returns. */
export function decorateKeys(inner: VaultKeys, around: Around): VaultKeys {
  const out: Record<string, unknown> = {
    get channelPublic() {
      return inner.channelPublic;
    },
    get signingPublic() {
      return inner.signingPublic;
    },
    currentEpoch: () => inner.currentEpoch(),
    epochs: () => inner.epochs(),
  };
  for (const op of Object.keys(OPS) as KeysOp[]) {
    const f = inner[op] as (...a: unknown[]) => Promise<unknown>;
    out[op] = (...args: unknown[]) => around(op, () => f.apply(inner, args), args);
  }
  return out as unknown as VaultKeys;
}
