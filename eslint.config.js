// Lint: typescript-eslint's recommended rules on every TypeScript file, plus the
// module boundaries the layout promises (README "Layout"), which a type check
// cannot see. Run with `npm run lint`; ./scripts/test runs it before the suite.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

const PKCS11 = { name: 'pkcs11js', message: 'only vault/hsm/ talks to the HSM library' };
const SQLITE = { name: 'better-sqlite3', message: 'only vault/store/ talks to SQLite' };
const APP_CALLERS = { group: ['**/daemon.js', '**/admin.js'], message: 'vault/app/ is called by the daemon and bkv-admin, never the reverse' };
const NO_VAULT = { group: ['**/vault/**', '../vault/*'], message: 'protocol/ and client/ must not import the daemon (vault/)' };

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'data/**', 'coverage/**', 'test/browser/*.js'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.ts'],
    rules: {
      // `_`-prefixed names are deliberately unused (destructuring, callbacks).
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
      // Control characters in patterns are the point where input is checked for them.
      'no-control-regex': 'off',
      // `let log; open(() => log); log = …`: a closure reads it before its one assignment.
      'prefer-const': ['error', { ignoreReadBeforeAssign: true }],
    },
  },
  {
    // Tests poke at untyped JSON answers (HTTP bodies, etcd's REST gateway) on purpose.
    files: ['test/**/*.ts'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
  // Module boundaries. One block per folder: a later block's no-restricted-imports replaces an earlier one's.
  {
    // The browser-safe protocol package and the SDK: no daemon, no HSM library, no SQLite.
    files: ['protocol/**/*.ts', 'client/**/*.ts'],
    rules: { 'no-restricted-imports': ['error', { paths: [PKCS11, SQLITE], patterns: [NO_VAULT] }] },
  },
  {
    // Only vault/hsm/ talks to pkcs11js, and only vault/store/ talks to SQLite.
    files: ['vault/**/*.ts', 'hsm-policy/**/*.ts'],
    ignores: ['vault/hsm/**', 'vault/store/**'],
    rules: { 'no-restricted-imports': ['error', { paths: [PKCS11, SQLITE] }] },
  },
  {
    // The operations both the daemon and offline bkv-admin run: neither of those two (they call in,
    // not the other way round), and no HSM library or SQLite (they get a directory and a secret).
    files: ['vault/app/**/*.ts'],
    rules: { 'no-restricted-imports': ['error', { paths: [PKCS11, SQLITE], patterns: [APP_CALLERS] }] },
  },
  { files: ['vault/hsm/**/*.ts'], rules: { 'no-restricted-imports': ['error', { paths: [SQLITE] }] } },
  { files: ['vault/store/**/*.ts'], rules: { 'no-restricted-imports': ['error', { paths: [PKCS11] }] } },
);
