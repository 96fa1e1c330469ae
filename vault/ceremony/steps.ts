// The key ceremony's steps, each on one HSM token, with files in between (see
// bundle.ts). Usable as a library (a cohort imports new seal epochs with
// exportBundle({epoch}) / importBundle) and from `bkv-admin ceremony` (cli.ts).
//
//   target-init  (target)       RSA-3072 key pair inside the new HSM, private half unwrap-only
//   trust        (source, SO)   the target's public key as a CKA_TRUSTED wrapping key, plus a
//                               trusted AES transport key generated inside the source
//   export       (source)       every key (or one seal epoch) wrapped for the target, with known answers
//   import       (target)       unwrap into keys of the policy's attributes, prove the known answers
//   seal         (each)         CKA_EXTRACTABLE=false on every key; the ceremony's objects removed
//
// Every refusal happens before the step changes anything, or undoes what it did.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { SecurityOfficer, Token, type Handle, type TokenConfig } from '../hsm/token.js';
import { enforcePolicy, emptyRoot, phaseOf, protectionFor, type ResolvedKeys } from '../../hsm-policy/enforce.js';
import { ANCHOR, CEREMONY, KEY_SET, PHASE_TEXT, epochOfLabel, sealLabel, type KeySpec, type Phase } from '../../hsm-policy/policy.js';
import { anchorLabel, parseAnchorLabel } from '../core/state-hash.js';
import { fromHex, toHex } from '../../protocol/bytes.js';
import { vaultIdOf } from '../../protocol/descriptor.js';
import {
  groupFingerprint,
  makeTargetFile,
  parseBundle,
  parseTarget,
  rsaFingerprint,
  serializeBundle,
  bundleDigest,
  specOfLabel,
  verifyBundle,
  type Bundle,
  type BundleBody,
  type KeyEntry,
  type Target,
  type TargetFile,
} from './bundle.js';
import { checkKat, makeKat, type LabelledKey } from './kat.js';
import type { CeremonyPort } from '../cohort/keyring.js';

const spec = (name: KeySpec['name']): KeySpec => KEY_SET.find((k) => k.name === name)!;
const b64 = (u: Uint8Array): string => Buffer.from(u).toString('base64');

/** Every private or secret key of a resolved set, by label. */
export function labelledKeys(r: ResolvedKeys): LabelledKey[] {
  return [
    { label: spec('kx').label, handle: r.kx.priv },
    { label: spec('sig').label, handle: r.sig.priv },
    { label: spec('oprf').label, handle: r.oprf.priv },
    { label: spec('verifier').label, handle: r.verifier },
    { label: spec('tenant').label, handle: r.tenant },
    ...[...r.seals.entries()].sort(([a], [b]) => a - b).map(([e, h]) => ({ label: sealLabel(e), handle: h })),
  ];
}

function phaseOfLabel(r: ResolvedKeys, label: string): Phase {
  return r.phases.find((p) => p.label === label)!.phase;
}

/** Refuse unless every key in `labels` is open for cloning. */
function requireOpen(r: ResolvedKeys, labels: string[]): void {
  const closed = labels.filter((l) => phaseOfLabel(r, l) !== 'open');
  if (closed.length === 0) return;
  const phases = [...new Set(closed.map((l) => phaseOfLabel(r, l)))];
  throw new VaultError(
    ErrorCodes.CEREMONY_NOT_CLONEABLE,
    `${closed.join(', ')} cannot be cloned: ${phases.map((p) => PHASE_TEXT[p]).join('; ')}. ` +
      'Only keys in the open phase leave an HSM through the ceremony; see docs/OPERATIONS.md for vendor cloning',
  );
}

/** The state anchor as the token holds it (the newer of the two slots). */
export function tokenAnchor(token: Token, r: ResolvedKeys): { seq: number; root: string } {
  const states = r.anchors.map((h) => parseAnchorLabel(token.readLabel(h))).filter((s) => s !== undefined);
  const best = states.reduce<(typeof states)[number] | undefined>((b, s) => (!b || s.seq > b.seq ? s : b), undefined);
  if (!best) throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, 'no HSM state anchor slot holds a readable label');
  return { seq: best.seq, root: toHex(best.root) };
}

// ---- target-init (on the target) ------------------------------------------------

/** The target's unwrap key pair, if it has one. */
function unwrapKey(token: Token): { priv: Handle; pub: Handle } | undefined {
  const priv = token.find('private', CEREMONY.unwrap);
  const pub = token.find('public', CEREMONY.unwrap);
  if (priv.length > 1 || pub.length > 1 || priv.length !== pub.length) {
    throw new VaultError(
      ErrorCodes.HSM_POLICY_VIOLATION,
      `"${CEREMONY.unwrap}" on this token is not one key pair (${priv.length} private, ${pub.length} public halves): remove it and run target-init again`,
    );
  }
  return priv[0] && pub[0] ? { priv: priv[0], pub: pub[0] } : undefined;
}

/**
 * Make (or, run again, find) the target's ceremony key: RSA-3072, generated in
 * this token, the private half sensitive, never extractable and unwrap-only.
 */
export function targetInit(token: Token, log: Logger): { target: TargetFile; created: boolean } {
  let k = unwrapKey(token);
  const created = !k;
  if (!k) k = token.generateRsaUnwrapKeyPair(CEREMONY.unwrap, CEREMONY.rsaBits);
  const { modulus, exponent } = token.rsaPublic(k.pub);
  const target = makeTargetFile(modulus, exponent, token.label, new Date().toISOString());
  log.info({ event: 'ceremony.target-init', fingerprint: target.fingerprint, created }, 'ceremony: target unwrap key ready');
  return { target, created };
}

// ---- trust (on the source, as Security Officer) --------------------------------------

function trustedFor(token: Token, target: Target): { pub?: Handle; transport?: Handle } {
  const pubs = token.find('public', CEREMONY.trust(target.fingerprint));
  const transports = token.find('secret', CEREMONY.transport(target.fingerprint));
  const pub = pubs.find((h) => {
    const k = token.rsaPublic(h);
    return rsaFingerprint(k.modulus, k.exponent) === target.fingerprint && token.attributes(h).trusted;
  });
  return { ...(pub ? { pub } : {}), ...(transports[0] ? { transport: transports[0] } : {}) };
}

/**
 * Let the vault's keys leave this token for `target`, and only for it: the SO
 * creates the target's public key as a trusted wrapping key, and a trusted AES
 * transport key inside the token (the EC keys can leave only under an AES key,
 * and a CKA_WRAP_WITH_TRUSTED key only under a trusted one, which only the SO
 * can make). Needs the user PIN (to check the vault is open for cloning) and
 * the SO PIN; the two logins never overlap.
 */
export function trust(hsm: TokenConfig, soPin: string, target: Target, log: Logger): { created: string[] } {
  let have: { pub?: Handle; transport?: Handle };
  const user = Token.open(hsm);
  try {
    const r = enforcePolicy(user, { create: false });
    requireOpen(r, labelledKeys(r).map((k) => k.label));
    have = trustedFor(user, target);
  } finally {
    user.close();
  }
  const created: string[] = [];
  SecurityOfficer.run(hsm, soPin, (so) => {
    const made: Handle[] = [];
    try {
      if (!have.pub) {
        made.push(so.createTrustedRsaPublicKey(CEREMONY.trust(target.fingerprint), target.modulus, target.exponent));
        created.push(CEREMONY.trust(target.fingerprint));
      }
      if (!have.transport) {
        made.push(so.generateTrustedTransportKey(CEREMONY.transport(target.fingerprint)));
        created.push(CEREMONY.transport(target.fingerprint));
      }
    } catch (e) {
      for (const h of made.reverse()) so.destroy(h);
      throw e;
    }
  });
  log.info({ event: 'ceremony.trust', fingerprint: target.fingerprint, labels: created }, 'ceremony: target trusted by the Security Officer');
  return { created };
}

// ---- export (on the source) ------------------------------------------------------

export interface ExportResult {
  text: string;
  bundle: Bundle;
  labels: string[];
}

/**
 * Wrap the vault's keys (or, with `epoch`, that seal epoch's key alone) for
 * `target`. The target must be trusted here (trust). A full export consumes the
 * transport key: it is wrapped into the bundle and destroyed. `anchor` goes into
 * the bundle only when the caller holds the token exclusively (offline), so the
 * anchor matches a copy of the database taken at the same time.
 */
export function exportBundle(token: Token, target: Target, opts: { epoch?: number; includeAnchor: boolean }, log: Logger): ExportResult {
  const r = enforcePolicy(token, { create: false });
  const all = labelledKeys(r);
  let keys: LabelledKey[];
  if (opts.epoch !== undefined) {
    const h = r.seals.get(opts.epoch);
    if (!h) {
      throw new VaultError(ErrorCodes.RECORD_NOT_FOUND, `no seal epoch ${opts.epoch} on this HSM (epochs: ${[...r.seals.keys()].sort((a, b) => a - b).join(', ')})`);
    }
    keys = [{ label: sealLabel(opts.epoch), handle: h }];
  } else keys = all;
  requireOpen(r, keys.map((k) => k.label));
  const have = trustedFor(token, target);
  if (!have.pub) {
    throw new VaultError(
      ErrorCodes.CEREMONY_WRONG_TARGET,
      `target ${groupFingerprint(target.fingerprint)} is not trusted on this HSM: run "bkv-admin ceremony trust" with this target file here first (it needs the Security Officer PIN)`,
    );
  }
  const full = opts.epoch === undefined;
  if (full) {
    const t = have.transport ? token.attributes(have.transport) : undefined;
    if (!t) {
      throw new VaultError(
        ErrorCodes.CEREMONY_TRANSPORT_MISSING,
        `no transport key for target ${groupFingerprint(target.fingerprint)}: every full export consumes the one "ceremony trust" makes; run trust again`,
      );
    }
    // Generated inside this token and never seen in the clear: otherwise whoever made it could open the EC keys.
    if (!(t.trusted && t.sensitive && t.alwaysSensitive && t.local && t.wrapWithTrusted && !t.unwrap && !t.decrypt)) {
      throw new VaultError(ErrorCodes.CEREMONY_TRANSPORT_MISSING, `the transport key "${t.label}" was not generated sensitive inside this HSM; remove it and run trust again`);
    }
  }
  const kat = makeKat(token, keys);
  const entries: KeyEntry[] = keys.map(({ label, handle }) =>
    specOfLabel(label)!.spec.kind === 'ec-p256'
      ? { label, wrap: 'aes-key-wrap-pad', blob: b64(token.wrapAesPad(have.transport!, handle)) }
      : { label, wrap: 'rsa-oaep', blob: b64(token.wrapOaep(have.pub!, handle)) },
  );
  const body: BundleBody = {
    format: 'bkv-ceremony-bundle',
    version: 1,
    kind: full ? 'full' : 'epoch',
    vaultId: toHex(vaultIdOf(r.sig.point)),
    target: target.fingerprint,
    createdAt: new Date().toISOString(),
    source: { sig: toHex(r.sig.point), kx: full ? toHex(r.kx.point) : null, oprf: full ? toHex(r.oprf.point) : null },
    anchor: full && opts.includeAnchor ? tokenAnchor(token, r) : null,
    transport: full ? b64(token.wrapOaep(have.pub, have.transport!)) : null,
    keys: entries,
    kat,
  };
  const signature = token.ecdsaSign(r.sig.priv, bundleDigest(body));
  const text = serializeBundle(body, signature);
  if (full) token.destroy(have.transport!);
  const labels = keys.map((k) => k.label);
  log.info(
    {
      event: 'ceremony.export',
      fingerprint: target.fingerprint,
      kind: body.kind,
      labels,
      anchorSeq: body.anchor?.seq ?? null,
    },
    `ceremony: ${labels.length} key(s) wrapped for the target`,
  );
  return { text, bundle: { ...body, signature: toHex(signature) }, labels };
}

// ---- import (on the target) --------------------------------------------------------

export interface ImportResult {
  kind: 'full' | 'epoch';
  vaultId: string;
  labels: string[];
  /** The anchor the token now holds (full import), and whether it came from the source. */
  anchor?: { seq: number; fromSource: boolean };
  /** Signing key point (what clients pin), hex. */
  sigPoint: string;
  /** Epoch import of a key the token already held (and that passed the known answers). */
  already?: boolean;
}

function refuseUnlessFor(token: Token, b: Bundle): Handle {
  const k = unwrapKey(token);
  if (!k) {
    throw new VaultError(ErrorCodes.CEREMONY_WRONG_TARGET, `this HSM has no ceremony unwrap key ("${CEREMONY.unwrap}"): the bundle was made for another HSM (run target-init on the HSM it was made for)`);
  }
  const { modulus, exponent } = token.rsaPublic(k.pub);
  const mine = rsaFingerprint(modulus, exponent);
  if (mine !== b.target) {
    throw new VaultError(
      ErrorCodes.CEREMONY_WRONG_TARGET,
      `the bundle was made for target ${groupFingerprint(b.target)}, but this HSM's ceremony key is ${groupFingerprint(mine)}: it can only be imported on the HSM it was made for`,
    );
  }
  return k.priv;
}

/** Objects of the vault on this token (keys and anchor), which a full import must not find. */
function vaultObjects(token: Token): string[] {
  const ours = new Set(KEY_SET.filter((k) => !k.perEpoch).map((k) => k.label));
  const keys = token.objects().filter((o) => ours.has(o.label) || epochOfLabel(o.label) !== undefined);
  return [...new Set(keys.map((o) => o.label)), ...(token.findData(ANCHOR.application).length ? [ANCHOR.application] : [])];
}

function unwrapFailed(label: string, e: unknown): VaultError {
  return new VaultError(ErrorCodes.CEREMONY_SELF_TEST_FAILED, `${label} does not unwrap on this HSM (${(e as Error).message}); nothing was imported`);
}

/**
 * Unwrap a bundle into this token. Checked before anything is made: its shape
 * (parseBundle), its signature, the vault it claims to be (`expectVaultId`, and
 * for an epoch bundle the vault this token already holds), and that this token
 * is its target. Then each key becomes a token key with the policy's
 * attributes, the known answers must come out, and the key set must pass the
 * policy; otherwise everything made is destroyed again.
 */
export function importBundle(token: Token, b: Bundle, opts: { expectVaultId?: string; freshAnchor?: boolean }, log: Logger): ImportResult {
  verifyBundle(b);
  if (opts.expectVaultId !== undefined && opts.expectVaultId.toLowerCase() !== b.vaultId) {
    throw new VaultError(
      ErrorCodes.CEREMONY_VAULT_MISMATCH,
      `the bundle holds the keys of vault ${b.vaultId}, not of vault ${opts.expectVaultId.toLowerCase()}; nothing was imported`,
    );
  }
  const sigPoint = fromHex(b.source.sig);
  if (b.kind === 'epoch') return importEpoch(token, b, sigPoint, log);

  if (opts.expectVaultId === undefined) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'a full import needs the expected vault id (--vault-id, from "bkv-admin status" on the source), compared out of band');
  }
  const unwrapping = refuseUnlessFor(token, b);
  const present = vaultObjects(token);
  if (present.length) {
    throw new VaultError(
      ErrorCodes.CEREMONY_TARGET_NOT_EMPTY,
      `this HSM already holds vault objects (${present.join(', ')}): a full import goes only into a token without them; nothing was imported`,
    );
  }
  const made: Handle[] = [];
  let transport: Handle | undefined;
  try {
    try {
      transport = token.unwrapTransportKey(unwrapping, Buffer.from(b.transport!, 'base64'));
    } catch (e) {
      throw unwrapFailed('the transport key', e);
    }
    const keys: LabelledKey[] = [];
    for (const k of b.keys) {
      const s = specOfLabel(k.label)!.spec;
      const t = { label: k.label, kind: s.kind === 'ec-p256' ? ('ec' as const) : s.kind === 'aes-256' ? ('aes' as const) : ('generic' as const), usages: s.usages, protection: protectionFor(s, 'open')! };
      let h: Handle;
      try {
        h = s.kind === 'ec-p256' ? token.unwrapAesPad(transport, Buffer.from(k.blob, 'base64'), t) : token.unwrapOaep(unwrapping, Buffer.from(k.blob, 'base64'), t);
      } catch (e) {
        throw unwrapFailed(k.label, e);
      }
      made.push(h);
      keys.push({ label: k.label, handle: h });
    }
    const failed = checkKat(token, keys, b.kat, sigPoint);
    if (failed.length) {
      throw new VaultError(
        ErrorCodes.CEREMONY_SELF_TEST_FAILED,
        `the copy of ${failed.join(', ')} does not compute what the source's key computes (known-answer test): it is not the source's key; nothing was imported`,
      );
    }
    const points = { 'bkv.kx': b.source.kx!, 'bkv.sig': b.source.sig, 'bkv.oprf': b.source.oprf! } as Record<string, string>;
    for (const s of KEY_SET.filter((k) => k.kind === 'ec-p256')) made.push(token.createEcPublicKey(s.label, fromHex(points[s.label]!), s.usages));
    const fromSource = !!b.anchor && !opts.freshAnchor;
    const label = fromSource ? anchorLabel(b.anchor!.seq, fromHex(b.anchor!.root)) : anchorLabel(0, emptyRoot());
    for (const slot of ANCHOR.slots) made.push(token.createData(ANCHOR.application, label, Buffer.from(slot)));
    // The whole set, as the daemon will see it at its next start.
    const r = enforcePolicy(token, { create: false });
    if (toHex(vaultIdOf(r.sig.point)) !== b.vaultId) throw new VaultError(ErrorCodes.CEREMONY_SELF_TEST_FAILED, 'the imported signing key is not the vault\'s');
    const labels = keys.map((k) => k.label);
    const anchor = { seq: fromSource ? b.anchor!.seq : 0, fromSource };
    log.info({ event: 'ceremony.import', vaultId: b.vaultId, fingerprint: b.target, kind: 'full', labels, anchorSeq: anchor.seq }, 'ceremony: vault keys imported and proven');
    return { kind: 'full', vaultId: b.vaultId, labels, anchor, sigPoint: b.source.sig };
  } catch (e) {
    for (const h of made.reverse()) {
      try {
        token.destroy(h);
      } catch {
        /* best effort: the error below says what failed */
      }
    }
    throw e;
  } finally {
    if (transport) {
      try {
        token.destroy(transport);
      } catch {
        /* a session object: gone with the session anyway */
      }
    }
  }
}

/** One seal epoch into a token that already holds this vault (cohort rotation). */
function importEpoch(token: Token, b: Bundle, sigPoint: Uint8Array, log: Logger): ImportResult {
  const r = enforcePolicy(token, { create: false });
  const mine = toHex(vaultIdOf(r.sig.point));
  if (mine !== b.vaultId) {
    throw new VaultError(ErrorCodes.CEREMONY_VAULT_MISMATCH, `the bundle holds a seal epoch of vault ${b.vaultId}, but this HSM holds vault ${mine}; nothing was imported`);
  }
  const unwrapping = refuseUnlessFor(token, b);
  const entry = b.keys[0]!;
  const epoch = epochOfLabel(entry.label)!;
  const s = spec('seal');
  const existing = r.seals.get(epoch);
  if (existing) {
    // Run again (or the epoch arrived another way): fine if it is the same key.
    if (checkKat(token, [{ label: entry.label, handle: existing }], b.kat, sigPoint).length) {
      throw new VaultError(ErrorCodes.CEREMONY_SELF_TEST_FAILED, `this HSM already holds ${entry.label}, and it is not the source's key; nothing was imported`);
    }
    log.info({ event: 'ceremony.import', vaultId: b.vaultId, fingerprint: b.target, kind: 'epoch', labels: [entry.label], already: true }, 'ceremony: seal epoch already present');
    return { kind: 'epoch', vaultId: b.vaultId, labels: [entry.label], sigPoint: b.source.sig, already: true };
  }
  // The new epoch joins in this token's phase (the current epoch's).
  const current = phaseOf(s, token.attributes(r.seals.get(Math.max(...r.seals.keys()))!))!.phase;
  if (current !== 'open' && current !== 'sealed') {
    throw new VaultError(ErrorCodes.CEREMONY_NOT_CLONEABLE, `this HSM's seal keys are ${PHASE_TEXT[current]}: an epoch cloned in through the ceremony would not match them`);
  }
  let h: Handle;
  try {
    h = token.unwrapOaep(unwrapping, Buffer.from(entry.blob, 'base64'), { label: entry.label, kind: 'aes', usages: s.usages, protection: protectionFor(s, current)! });
  } catch (e) {
    throw unwrapFailed(entry.label, e);
  }
  try {
    if (checkKat(token, [{ label: entry.label, handle: h }], b.kat, sigPoint).length) {
      throw new VaultError(ErrorCodes.CEREMONY_SELF_TEST_FAILED, `the copy of ${entry.label} does not compute what the source's key computes (known-answer test); nothing was imported`);
    }
    enforcePolicy(token, { create: false });
  } catch (e) {
    token.destroy(h);
    throw e;
  }
  log.info({ event: 'ceremony.import', vaultId: b.vaultId, fingerprint: b.target, kind: 'epoch', labels: [entry.label] }, 'ceremony: seal epoch imported and proven');
  return { kind: 'epoch', vaultId: b.vaultId, labels: [entry.label], sigPoint: b.source.sig };
}

// ---- seal (on each HSM) ------------------------------------------------------------

/**
 * End the ceremony on this token: CKA_EXTRACTABLE=false on every open key (no
 * one can raise it again, not even the SO), and every ceremony object — trusted
 * wrapping keys, transport keys, the target's unwrap key — destroyed.
 */
export function seal(token: Token, log: Logger): { sealed: string[]; removed: string[]; phase: Phase | 'mixed'; otherTrusted: string[] } {
  const r = enforcePolicy(token, { create: false });
  const sealed: string[] = [];
  for (const { label, handle } of labelledKeys(r)) {
    if (phaseOfLabel(r, label) !== 'open') continue;
    token.makeUnextractable(handle);
    sealed.push(label);
  }
  const removed: string[] = [];
  for (const o of token.objects()) {
    if (!o.label.startsWith(CEREMONY.prefix)) continue;
    token.destroy(o.handle);
    removed.push(o.label);
  }
  const after = enforcePolicy(token, { create: false });
  const otherTrusted = token.trustedKeys().map((k) => k.label);
  log.info({ event: 'ceremony.seal', sealed, removed, phase: after.phase }, 'ceremony: keys sealed, ceremony objects removed');
  return { sealed, removed, phase: after.phase, otherTrusted };
}

// ---- what status shows -------------------------------------------------------------

export interface CeremonyObjects {
  /** Fingerprint prefixes of targets trusted here (source side). */
  trusted: string[];
  /** Transport keys waiting for a full export. */
  transport: string[];
  /** Fingerprint of this token's ceremony unwrap key (target side). */
  unwrapKey?: string;
  /** Other CKA_TRUSTED objects: exits for open keys this vault did not make. */
  otherTrusted: string[];
}

export function ceremonyObjects(token: Token): CeremonyObjects {
  const objs = token.objects().filter((o) => o.label.startsWith(CEREMONY.prefix));
  const suffix = (p: string) => objs.filter((o) => o.label.startsWith(p)).map((o) => o.label.slice(p.length));
  const trustPrefix = CEREMONY.trust('');
  const transportPrefix = CEREMONY.transport('');
  const u = unwrapKey(token);
  const k = u ? token.rsaPublic(u.pub) : undefined;
  return {
    trusted: suffix(trustPrefix),
    transport: suffix(transportPrefix),
    ...(k ? { unwrapKey: rsaFingerprint(k.modulus, k.exponent) } : {}),
    otherTrusted: token
      .trustedKeys()
      .map((t) => t.label)
      .filter((l) => !l.startsWith(CEREMONY.prefix)),
  };
}

// ---- export through the running daemon --------------------------------------------

/**
 * `ceremony export` while the daemon owns the token: a second Token in the
 * daemon's own process (one writer per token; the login is the daemon's), the
 * same export, no anchor in the bundle (it moves while the vault serves).
 */
export function exportInDaemon(hsm: TokenConfig, targetText: string, epoch: number | undefined, log: Logger): { bundle: string; kind: string; labels: string[] } {
  const target = parseTarget(targetText);
  const token = Token.open(hsm);
  try {
    const r = exportBundle(token, target, { ...(epoch !== undefined ? { epoch } : {}), includeAnchor: false }, log);
    return { bundle: r.text, kind: r.bundle.kind, labels: r.labels };
  } finally {
    token.close();
  }
}

// ---- the cohort's rotation (cohort/keyring.ts) ---------------------------------------

/**
 * What a cohort node's rotation needs of the ceremony, each step on a second
 * Token in the daemon's process (as exportInDaemon): this HSM's target, a seal
 * epoch wrapped for another node's trusted target, and the import of a bundle
 * made for this HSM (checked to be of the vault this HSM holds, and proven by
 * its known answers).
 */
export function cohortCeremony(hsm: TokenConfig, log: Logger): CeremonyPort {
  const withToken = <T>(f: (t: Token) => T): T => {
    const token = Token.open(hsm);
    try {
      return f(token);
    } finally {
      token.close();
    }
  };
  return {
    target: () =>
      withToken((token) => {
        const k = unwrapKey(token);
        if (!k) return undefined;
        const { modulus, exponent } = token.rsaPublic(k.pub);
        const file = makeTargetFile(modulus, exponent, token.label, '');
        return { fingerprint: file.fingerprint, text: JSON.stringify(file) };
      }),
    exportEpoch: (targetText, epoch) => withToken((token) => exportBundle(token, parseTarget(targetText), { epoch, includeAnchor: false }, log).text),
    importEpoch: (bundleText) =>
      withToken((token) => {
        const b = parseBundle(bundleText);
        const mine = toHex(vaultIdOf(enforcePolicy(token, { create: false }).sig.point));
        importBundle(token, b, { expectVaultId: mine }, log);
      }),
  };
}
