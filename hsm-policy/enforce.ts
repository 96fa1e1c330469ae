// Brings a token in line with the key set in policy.ts: creates what is
// missing (only when asked to), and refuses with HSM_POLICY_VIOLATION when an
// existing object is weaker than the policy, e.g. someone made it extractable
// or gave it an extra usage. A vault never runs on keys it cannot vouch for.
import { p256 } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { VaultError, ErrorCodes } from '../protocol/errors.js';
import { P256_OID, type Handle, type KeyAttributes, type KeyProtection, type Token } from '../vault/hsm/token.js';
import {
  ANCHOR,
  CREATE_PHASE,
  CREATE_PROTECTION,
  KEY_SET,
  PHASE_RULES,
  REQUIRED_ATTRIBUTES,
  epochOfLabel,
  sealLabel,
  type KeySpec,
  type KeyUsage,
  type Phase,
  type PhaseRule,
} from './policy.js';
import { BucketTree, anchorLabel } from '../vault/core/state-hash.js';

export interface EcKey {
  priv: Handle;
  pub: Handle;
  /** Uncompressed SEC1 public point (65 bytes). */
  point: Uint8Array;
}

/** Handles of the vault's key set, resolved once at start. */
export interface ResolvedKeys {
  kx: EcKey;
  sig: EcKey;
  oprf: EcKey;
  verifier: Handle;
  tenant: Handle;
  /** The two state anchor slots (data objects), in ANCHOR.slots order. */
  anchors: [Handle, Handle];
  /** Seal keys by epoch; the highest is current. */
  seals: Map<number, Handle>;
  /** Labels of the objects this call created (empty on a second run: init is idempotent). */
  created: string[];
  /** The key set's phase (policy.ts), or 'mixed' while keys disagree (e.g. an interrupted seal). */
  phase: Phase | 'mixed';
  /** Each private or secret key's phase and the policy row it matched. */
  phases: KeyPhase[];
}

export interface KeyPhase {
  label: string;
  phase: Phase;
  origin: string;
}

const USAGES: KeyUsage[] = ['derive', 'sign', 'verify', 'encrypt', 'decrypt'];

const attrName = (k: string): string => `CKA_${k.replace(/[A-Z]/g, (c) => '_' + c).toUpperCase()}`;

const PROTECTION_FIELDS = ['extractable', 'wrapWithTrusted', 'alwaysSensitive', 'neverExtractable', 'local', 'modifiable'] as const;

/** How `attrs` differs from one phase rule (empty: it matches). */
function ruleMismatches(spec: KeySpec, rule: PhaseRule, attrs: KeyAttributes): string[] {
  const out: string[] = [];
  for (const k of PROTECTION_FIELDS) {
    const want = rule[k];
    if (want !== undefined && attrs[k] !== want) out.push(`${attrs.label}: ${attrName(k)} is ${attrs[k]}, policy requires ${want}`);
  }
  if (rule.allowedMechanisms === 'own' && attrs.allowedMechanisms.join(',') !== spec.mechanism) {
    out.push(`${attrs.label}: CKA_ALLOWED_MECHANISMS is [${attrs.allowedMechanisms.join(', ')}], policy requires [${spec.mechanism}]`);
  }
  return out;
}

/** The policy row (and so the phase) a key's protection attributes match, if any. */
export function phaseOf(spec: KeySpec, attrs: KeyAttributes): PhaseRule | undefined {
  return PHASE_RULES.find((r) => ruleMismatches(spec, r, attrs).length === 0);
}

/** Why `attrs` does not satisfy `spec`; empty when it does. */
export function violations(spec: KeySpec, attrs: KeyAttributes): string[] {
  const out: string[] = [];
  for (const [k, want] of Object.entries(REQUIRED_ATTRIBUTES)) {
    const got = attrs[k as keyof typeof REQUIRED_ATTRIBUTES];
    if (got !== want) out.push(`${attrs.label}: ${attrName(k)} is ${got}, policy requires ${want}`);
  }
  if (!phaseOf(spec, attrs)) {
    // Name the differences from the nearest phase: what would make this key acceptable.
    const nearest = PHASE_RULES.map((r) => ({ r, m: ruleMismatches(spec, r, attrs) })).reduce((a, b) => (b.m.length < a.m.length ? b : a));
    out.push(...nearest.m.map((m) => `${m} (nearest phase: ${nearest.r.phase}, ${nearest.r.origin})`));
  }
  for (const u of USAGES) {
    // Public-key-only flags (verify on an EC private key) read as false, which is what we want.
    const want = spec.usages.includes(u);
    if (attrs[u] !== want) out.push(`${attrs.label}: CKA_${u.toUpperCase()} is ${attrs[u]}, policy requires ${want}`);
  }
  // SoftHSM 2.6.1 records no CKA_VALUE_LEN (reads 0) for a key it unwrapped, and refuses one in
  // the unwrap template (measured); such a key came in through the ceremony, whose known answers
  // proved it equal to the source's 32-byte key.
  const len32 = attrs.valueLen === 32 || (attrs.valueLen === 0 && !attrs.local);
  const kindOk =
    spec.kind === 'ec-p256'
      ? attrs.keyType === 'ec' && Buffer.from(attrs.ecParams).equals(P256_OID)
      : spec.kind === 'aes-256'
        ? attrs.keyType === 'aes' && len32
        : attrs.keyType === 'generic' && len32;
  if (!kindOk) out.push(`${attrs.label}: key type is not ${spec.kind}`);
  return out;
}

/**
 * What a new key of `spec` is created (or unwrapped) with in `phase`; undefined
 * for never-extractable keys, which the token layer makes as it always has.
 */
export function protectionFor(spec: KeySpec, phase: Phase): KeyProtection | undefined {
  const p = CREATE_PROTECTION[CREATE_PHASE[phase]];
  if (!p.extractable && !p.wrapWithTrusted) return undefined;
  return { extractable: p.extractable, wrapWithTrusted: p.wrapWithTrusted, modifiable: p.modifiable, allowedMechanisms: p.ownMechanism ? [spec.mechanism] : [] };
}

/** One phase for a key set: theirs if they agree, else 'mixed'. */
export function setPhase(phases: readonly { phase: Phase }[]): Phase | 'mixed' {
  const distinct = new Set(phases.map((p) => p.phase));
  return distinct.size === 1 ? [...distinct][0]! : 'mixed';
}

function one(token: Token, cls: 'private' | 'public' | 'secret', label: string): Handle | undefined {
  const found = token.find(cls, label);
  if (found.length > 1) {
    throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `${found.length} ${cls} objects labelled "${label}": ambiguous key`);
  }
  return found[0];
}

interface Making {
  create: boolean;
  /** Phase new keys are made in. */
  phase: Phase;
  created: string[];
  /** Handles of what this call made: destroyed again if the call fails (a failed init leaves no half-made set). */
  made: Handle[];
  phases: KeyPhase[];
}

function ecKey(token: Token, spec: KeySpec, m: Making): EcKey {
  let priv = one(token, 'private', spec.label);
  let pub = one(token, 'public', spec.label);
  if (!priv && !pub && m.create) {
    ({ priv, pub } = token.generateEcKeyPair(spec.label, spec.usages, protectionFor(spec, m.phase)));
    m.made.push(priv, pub);
    m.created.push(spec.label);
  }
  if (!priv || !pub) throw missing(spec.label);
  m.phases.push(check(spec, token.attributes(priv)));
  const point = token.ecPoint(pub);
  if (!pairMatches(token, spec, priv, point)) {
    throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `${spec.label}: public key object does not belong to the private key`);
  }
  return { priv, pub, point };
}

// The published point is what clients pin and encrypt to, so it must be the
// private key's own: a swapped public object would silently break every client.
function pairMatches(token: Token, spec: KeySpec, priv: Handle, point: Uint8Array): boolean {
  try {
    if (spec.usages.includes('derive')) {
      // x(k·G) is the x-coordinate of the key's own public point.
      const x = token.ecdhX(priv, p256.Point.BASE.toBytes(false));
      return Buffer.from(x).equals(Buffer.from(point.subarray(1, 33)));
    }
    const digest = sha256(new TextEncoder().encode('bkv key pair check'));
    return p256.verify(token.ecdsaSign(priv, digest), digest, point, { prehash: false, format: 'compact', lowS: false });
  } catch {
    return false;
  }
}

function secretKey(token: Token, spec: KeySpec, label: string, m: Making): Handle {
  let h = one(token, 'secret', label);
  if (!h && m.create) {
    h = token.generateSecretKey(label, spec.kind === 'aes-256' ? 'aes' : 'generic', 32, spec.usages, protectionFor(spec, m.phase));
    m.made.push(h);
    m.created.push(label);
  }
  if (!h) throw missing(label);
  m.phases.push(check(spec, token.attributes(h)));
  return h;
}

function check(spec: KeySpec, attrs: KeyAttributes): KeyPhase {
  const v = violations(spec, attrs);
  if (v.length) throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `HSM key policy violated: ${v.join('; ')}`);
  const rule = phaseOf(spec, attrs)!;
  return { label: attrs.label, phase: rule.phase, origin: rule.origin };
}

/**
 * The phase keys missing from a partial set are made in: the phase the keys
 * already there agree on, else open for cloning (a new vault).
 */
function creationPhase(token: Token): Phase {
  const seen: Phase[] = [];
  for (const s of KEY_SET) {
    const found = s.perEpoch ? token.listLabels('secret', s.label).map((o) => o.handle) : token.find(s.kind === 'ec-p256' ? 'private' : 'secret', s.label);
    for (const h of found) {
      const rule = phaseOf(s, token.attributes(h));
      if (rule) seen.push(rule.phase);
    }
  }
  const p = setPhase(seen.map((phase) => ({ phase })));
  // A new vault: open for cloning where the module can hold open keys as the policy requires.
  return seen.length === 0 || p === 'mixed' ? token.quirks.keyPhase : p;
}

function missing(label: string): VaultError {
  return new VaultError(
    ErrorCodes.HSM_POLICY_VIOLATION,
    `HSM key "${label}" is missing or incomplete; run "bkv-admin init" on a fresh token`,
  );
}

const spec = (name: KeySpec['name']): KeySpec => KEY_SET.find((k) => k.name === name)!;

/**
 * Resolve (and with `create`, make) the vault's keys on `token`. With
 * `create: false` a missing key is an error: a running vault never silently
 * mints a new OPRF key, which would make every existing record unrecoverable.
 */
export function enforcePolicy(token: Token, opts: { create: boolean; phase?: Phase }): ResolvedKeys {
  const m: Making = { create: opts.create, phase: opts.phase ?? (opts.create ? creationPhase(token) : 'open'), created: [], made: [], phases: [] };
  try {
    return resolveKeys(token, opts, m);
  } catch (e) {
    // Whatever this call made goes again: a later init starts from the same token, not a half-made set.
    for (const h of m.made.reverse()) {
      try {
        token.destroy(h);
      } catch {
        /* the failure that got us here may be the token itself */
      }
    }
    throw e;
  }
}

function resolveKeys(token: Token, opts: { create: boolean }, m: Making): ResolvedKeys {
  const kx = ecKey(token, spec('kx'), m);
  const sig = ecKey(token, spec('sig'), m);
  const oprf = ecKey(token, spec('oprf'), m);
  const verifier = secretKey(token, spec('verifier'), spec('verifier').label, m);
  const tenant = secretKey(token, spec('tenant'), spec('tenant').label, m);
  const seals = new Map<number, Handle>();
  for (const { label } of token.listLabels('secret', spec('seal').label)) {
    const epoch = epochOfLabel(label);
    if (epoch === undefined) {
      throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `unexpected seal key label "${label}" (want bkv.seal.NNNNNN)`);
    }
    seals.set(epoch, secretKey(token, spec('seal'), label, { ...m, create: false }));
  }
  if (seals.size === 0) seals.set(1, secretKey(token, spec('seal'), sealLabel(1), m));
  const anchors = anchorSlots(token, opts.create, m.created, m.made);
  return { kx, sig, oprf, verifier, tenant, anchors, seals, created: m.created, phase: setPhase(m.phases), phases: m.phases };
}

/**
 * The protection a new seal epoch key gets: the phase of the current epoch's
 * key, so a rotation keeps the vault in its phase (an open vault's new epoch
 * can be cloned to the cohort; a sealed vault's never leaves).
 */
export function epochProtection(token: Token, currentSealKey: Handle): KeyProtection | undefined {
  const s = spec('seal');
  const rule = phaseOf(s, token.attributes(currentSealKey));
  return protectionFor(s, rule?.phase ?? 'open');
}

/** Root of the empty state: what a fresh token's anchor starts at. */
export function emptyRoot(): Uint8Array {
  return new BucketTree().root();
}

/**
 * The two anchor slots. Where they live is the module's business (ModuleQuirks.anchor,
 * measured by vault/hsm/capabilities.ts): private token data objects, or, on a module
 * that refuses those (NSS softoken), the labels of two usage-less secret keys told
 * apart by CKA_ID. A token keeps whichever form it was made with.
 */
function anchorSlots(token: Token, create: boolean, created: string[], made: Handle[]): [Handle, Handle] {
  const data = dataAnchors(token);
  if (data.length === 0) {
    const keys = keyAnchors(token);
    if (keys.some((k) => k.length > 0) || (create && token.quirks.anchor === 'key')) return keySlots(token, keys, create, created, made);
  }
  const found = data;
  const slots = ANCHOR.slots.map((v) => found.filter((f) => f.value === v));
  if (found.length > 2 || slots.some((s) => s.length > 1) || found.some((f) => !(ANCHOR.slots as readonly string[]).includes(f.value))) {
    throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `unexpected state anchor objects on the token (${found.length}): ambiguous`);
  }
  const [a, b] = slots.map((s) => s[0]?.h);
  if (!a && !b) {
    if (!create) throw missing(ANCHOR.application);
    created.push(ANCHOR.application);
    const label = anchorLabel(0, emptyRoot());
    const first = token.createData(ANCHOR.application, label, Buffer.from(ANCHOR.slots[0]));
    made.push(first);
    return [first, token.createData(ANCHOR.application, label, Buffer.from(ANCHOR.slots[1]))];
  }
  // One slot lost (a write torn by a crash, or a token from before there were two):
  // recreate it from the other. The torn write never completed, so no answer depended on it.
  const copy = (from: Handle, value: string) => token.createData(ANCHOR.application, token.readLabel(from), Buffer.from(value));
  return [a ?? copy(b!, ANCHOR.slots[0]), b ?? copy(a!, ANCHOR.slots[1])];
}

function dataAnchors(token: Token): { h: Handle; value: string }[] {
  let handles: Handle[];
  try {
    handles = token.findData(ANCHOR.application);
  } catch (e) {
    // A module that refuses data objects may refuse to search for them too.
    if (token.quirks.anchor === 'key' && e instanceof VaultError && e.code === ErrorCodes.HSM_ERROR) return [];
    throw e;
  }
  return handles.map((h) => ({ h, value: token.dataValue(h).toString('utf8') }));
}

const keyAnchors = (token: Token): Handle[][] => ANCHOR.slots.map((id) => token.findKeyById(id));

function keySlots(token: Token, keys: Handle[][], create: boolean, created: string[], made: Handle[]): [Handle, Handle] {
  if (keys.some((k) => k.length > 1)) {
    throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `unexpected state anchor keys on the token (${keys.flat().length}): ambiguous`);
  }
  for (const h of keys.flat()) {
    const a = token.attributes(h);
    const usable = USAGES.filter((u) => a[u]);
    if (usable.length || a.wrap || a.unwrap || a.extractable || !a.sensitive) {
      throw new VaultError(ErrorCodes.HSM_POLICY_VIOLATION, `state anchor key "${a.label}" can be used or extracted (${[...usable, ...(a.extractable ? ['extractable'] : [])].join(', ') || 'not sensitive'}): refusing it`);
    }
  }
  const [a, b] = keys.map((k) => k[0]);
  if (!a && !b) {
    if (!create) throw missing(ANCHOR.application);
    created.push(ANCHOR.application);
    const label = anchorLabel(0, emptyRoot());
    const first = token.createAnchorKey(ANCHOR.slots[0], label);
    made.push(first);
    return [first, token.createAnchorKey(ANCHOR.slots[1], label)];
  }
  // As for data objects: a slot lost to a torn write is recreated from the other.
  return [a ?? token.createAnchorKey(ANCHOR.slots[0], token.readLabel(b!)), b ?? token.createAnchorKey(ANCHOR.slots[1], token.readLabel(a!))];
}
