# Backup Key Vault appliance image.
#
#   docker build --network host -t bkv-vault .
#   docker run -d --name bkv --network host \
#     -v bkv-data:/var/lib/bkv -v bkv-tokens:/var/lib/bkv/tokens bkv-vault
#
# Default: `bkv-vault serve --init` with the embedded SoftHSM2 token under the
# data volume (development and evaluation). Against a real HSM, mount its
# PKCS#11 module and set BKV_HSM_MODULE, BKV_HSM_TOKEN and the PIN through
# BKV_HSM_PIN_FILE (a mounted secret) or BKV_HSM_PIN — never an argument, and
# never baked in here. See docs/OPERATIONS.md.

# ---- build: compile TypeScript and the native modules, then drop dev dependencies
FROM node:20-bookworm-slim AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json ./
# node-gyp builds better-sqlite3 and pkcs11js against the headers installed
# beside this node binary (no header download at build time).
RUN export npm_config_nodedir="$(dirname "$(dirname "$(command -v node)")")" \
 && npm ci --no-audit --no-fund --loglevel=error
COPY tsconfig.json ./
COPY vault ./vault
COPY hsm-policy ./hsm-policy
COPY client ./client
COPY protocol ./protocol
COPY lib ./lib
# Only what ships: the daemon, the policy and the client (not scripts/ or bench/, which may import tests).
RUN printf '{"extends":"./tsconfig.json","compilerOptions":{"incremental":false},"include":["vault","hsm-policy","client"]}\n' > tsconfig.image.json \
 && npx tsc -p tsconfig.image.json \
 && npm prune --omit=dev --no-audit --no-fund --loglevel=error \
 && chmod 755 dist/vault/main.js dist/vault/admin.js dist/client/cli.js

# ---- runtime: Node, SoftHSM2 for the embedded default, the compiled vault
FROM node:20-bookworm-slim
# libjemalloc2: the daemon's malloc (ENV LD_PRELOAD below; see docs/OPERATIONS.md).
# libnss3 (+ certutil from libnss3-tools): NSS softoken, the second reference module, through
# hsm.module=/usr/lib/<arch>/libsoftokn3.so and hsm.libraryParameters (docs/OPERATIONS.md "PKCS#11 modules").
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends softhsm2 tini libjemalloc2 libnss3 libnss3-tools \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(ls /usr/lib/*-linux-gnu/libjemalloc.so.2 | head -n 1)" /usr/local/lib/libjemalloc.so.2 \
 && groupadd --system --gid 10001 bkv \
 && useradd --system --uid 10001 --gid bkv --home-dir /var/lib/bkv --no-create-home --shell /usr/sbin/nologin bkv \
 && mkdir -p /var/lib/bkv/tokens \
 && chown -R bkv:bkv /var/lib/bkv \
 && chmod 700 /var/lib/bkv /var/lib/bkv/tokens
WORKDIR /opt/bkv
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
RUN ln -s /opt/bkv/dist/vault/main.js /usr/local/bin/bkv-vault \
 && ln -s /opt/bkv/dist/vault/admin.js /usr/local/bin/bkv-admin \
 && ln -s /opt/bkv/dist/client/cli.js /usr/local/bin/bkv

# jemalloc keeps RSS flat through the HSM library recycles, where glibc's per-thread
# arenas keep what SoftHSM freed (docs/PERFORMANCE.md); unset LD_PRELOAD to opt out.
ENV NODE_ENV=production \
    BKV_DATA=/var/lib/bkv \
    LD_PRELOAD=/usr/local/lib/libjemalloc.so.2
# The data folder (database, audit log, public key, embedded token's PIN files)
# and the embedded token store are separate volumes: the token store is the
# "HSM", and must never travel with database backups.
VOLUME ["/var/lib/bkv", "/var/lib/bkv/tokens"]
USER bkv:bkv
# 8787: vault WebSocket RPC; 8788: admin (health, readiness, metrics), loopback by default.
EXPOSE 8787 8788
# The daemon drains in-flight requests, writes a final HSM-signed audit
# checkpoint and closes the token on SIGTERM; give it time (docker stop -t 30).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["bkv-admin", "health", "--ready"]
ENTRYPOINT ["/usr/bin/tini", "--", "bkv-vault"]
CMD ["serve", "--init"]
