#!/usr/bin/env node
// Lints Cypher statements as Neo4j 5 (Cypher 5) would see them, with Neo4j's own
// @neo4j-cypher/language-support (its ANTLR parser plus Neo4j's semantic analysis compiled
// to JavaScript). Production runs Neo4j 5, which cannot run in CI, so this is what tells us a
// statement is valid there.
//
// stdin:  [{"name": "...", "query": "..."}, ...]
//    or   {"statements": [...], "labels": [...], "relationshipTypes": [...]}
//         (labels / relationshipTypes replace the defaults below; tests/sinks/cypher_lint.py
//          passes streamer.contracts.events.NODE_LABELS and ALL_REL_TYPES, so they cannot drift)
// stdout: [{"name": "...", "diagnostics": [{"severity": "error"|"warning"|"information"|"hint",
//          "message": "...", "offsets": {"start": n, "end": n},
//          "range": {"start": {"line", "character"}, "end": {...}}, "source": "neo4j"|"kg-streamer"}]}]
// `node lint.mjs --schema` prints what the statements are linted against instead.
// Exit status: 0 when linting ran (whatever the diagnostics), 2 on bad input.
//
// The schema: the package's testData.mockSchema lists Neo4j's built-in functions and procedures
// per Cypher version. Plugin namespaces (APOC, GDS) are removed so that any use of them is an
// error: production Neo4j is not promised either plugin. Labels and relationship types are
// ours, so a misspelt label is a warning. Property keys are left out on purpose (properties
// of product attributes are open-ended; leaving them out turns that check off). Parameters are
// left out too and the linter's "Parameter $x is not defined." errors are dropped: parameters
// are supplied at run time by the driver.
//
// Checks added here (source "kg-streamer"), because the package does not make them:
//  * a version prefix other than CYPHER 5 (the package would silently lint it as Cypher 25);
//  * more than one statement in one query (the driver sends one statement per run);
//  * an empty query.

import { readFileSync } from 'node:fs';
import {
  lintCypherQuery,
  isNotParamError,
  parseStatementsStrs,
  testData,
} from '@neo4j-cypher/language-support';

const CYPHER_VERSION = 'CYPHER 5';
const PLUGIN_PREFIXES = ['apoc.', 'gds.'];
// Mirrors streamer/contracts/events.py (NODE_LABELS, ALL_REL_TYPES); a test checks they agree.
const DEFAULT_LABELS = ['Product', 'User', 'Brand', 'Category', 'Attribute'];
const DEFAULT_RELATIONSHIP_TYPES = [
  'ALSO_BOUGHT', 'ALSO_VIEWED', 'BOUGHT_TOGETHER', 'SIMILAR_TO', 'SUBSTITUTE_OF',
  'COMPLEMENT_OF', 'VARIANT_OF',
  'HAS_BRAND', 'IN_CATEGORY', 'HAS_ATTRIBUTE', 'PARENT',
  'VIEWED', 'CLICKED', 'CARTED', 'PURCHASED', 'RATED',
];

const SEVERITY = { 1: 'error', 2: 'warning', 3: 'information', 4: 'hint' };

function packageVersion() {
  // The package's "exports" hides its package.json; read it where `npm ci` put it.
  const url = new URL('./node_modules/@neo4j-cypher/language-support/package.json', import.meta.url);
  return JSON.parse(readFileSync(url, 'utf8')).version;
}

function withoutPlugins(registry) {
  return Object.fromEntries(
    Object.entries(registry ?? {}).filter(
      ([name]) => !PLUGIN_PREFIXES.some((prefix) => name.startsWith(prefix)),
    ),
  );
}

function buildSchema({
  labels = DEFAULT_LABELS,
  relationshipTypes = DEFAULT_RELATIONSHIP_TYPES,
} = {}) {
  const mock = testData.mockSchema;
  const perVersion = (registries) =>
    Object.fromEntries(Object.entries(registries).map(([v, reg]) => [v, withoutPlugins(reg)]));
  return {
    functions: perVersion(mock.functions),
    procedures: perVersion(mock.procedures),
    labels: [...labels],
    relationshipTypes: [...relationshipTypes],
    defaultLanguage: CYPHER_VERSION,
  };
}

// The preparser part of a query: comments, EXPLAIN / PROFILE, then CYPHER <version>.
const VERSION_PREFIX =
  /^(?:\s+|\/\/[^\n]*(?:\n|$)|\/\*[\s\S]*?\*\/|EXPLAIN\b|PROFILE\b)*CYPHER\s+([0-9][0-9.]*)\b/i;

function positionAt(query, offset) {
  const before = query.slice(0, offset).split('\n');
  return { line: before.length - 1, character: before.at(-1).length };
}

function ownDiagnostic(query, start, end, message) {
  return {
    severity: 'error',
    message,
    offsets: { start, end },
    range: { start: positionAt(query, start), end: positionAt(query, end) },
    source: 'kg-streamer',
  };
}

function ownChecks(query) {
  const found = [];
  if (query.trim().length === 0) {
    found.push(ownDiagnostic(query, 0, query.length, 'Empty statement.'));
    return found;
  }
  const version = VERSION_PREFIX.exec(query);
  if (version && version[1] !== '5') {
    const start = version.index + version[0].length - version[1].length;
    found.push(
      ownDiagnostic(
        query, start, start + version[1].length,
        `CYPHER ${version[1]} selected: production runs Neo4j 5, so statements must be Cypher 5 ` +
          '(no version prefix, or CYPHER 5).',
      ),
    );
  }
  const statements = parseStatementsStrs(query).filter((s) => s.trim().length > 0);
  if (statements.length > 1) {
    found.push(
      ownDiagnostic(
        query, 0, query.length,
        `${statements.length} statements in one query: the driver sends exactly one statement per run.`,
      ),
    );
  }
  return found;
}

function lintStatement(query, schema) {
  const { diagnostics } = lintCypherQuery(query, schema, { consoleCommandsEnabled: false });
  const fromNeo4j = diagnostics.filter(isNotParamError).map((d) => ({
    severity: SEVERITY[d.severity] ?? String(d.severity),
    message: d.message,
    offsets: d.offsets,
    range: d.range,
    source: 'neo4j',
  }));
  return [...ownChecks(query), ...fromNeo4j];
}

function fail(message) {
  process.stderr.write(`cypher-lint: ${message}\n`);
  process.exit(2);
}

function parseInput(text) {
  let doc;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    fail(`stdin is not JSON: ${err.message}`);
  }
  const options = Array.isArray(doc) ? { statements: doc } : doc;
  if (!options || !Array.isArray(options.statements)) {
    fail('expected a JSON array of {"name", "query"} or an object with "statements"');
  }
  for (const key of ['labels', 'relationshipTypes']) {
    if (options[key] !== undefined &&
        !(Array.isArray(options[key]) && options[key].every((x) => typeof x === 'string'))) {
      fail(`"${key}" must be an array of strings`);
    }
  }
  options.statements.forEach((item, i) => {
    if (!item || typeof item.query !== 'string') fail(`statement ${i} has no string "query"`);
    if (item.name !== undefined && typeof item.name !== 'string') fail(`statement ${i}: "name" must be a string`);
  });
  return options;
}

function main(argv) {
  // stdout carries only the JSON answer: anything the package logs goes to stderr.
  for (const level of ['log', 'info', 'warn', 'debug']) {
    console[level] = (...args) => process.stderr.write(args.join(' ') + '\n');
  }
  if (argv.includes('--schema')) {
    const schema = buildSchema();
    const count = (reg) => Object.keys(reg[CYPHER_VERSION] ?? {}).length;
    process.stdout.write(JSON.stringify({
      package: '@neo4j-cypher/language-support',
      version: packageVersion(),
      cypherVersion: CYPHER_VERSION,
      pluginPrefixesRemoved: PLUGIN_PREFIXES,
      labels: schema.labels,
      relationshipTypes: schema.relationshipTypes,
      functions: count(schema.functions),
      procedures: count(schema.procedures),
    }) + '\n');
    return;
  }
  const options = parseInput(readFileSync(0, 'utf8'));
  const schema = buildSchema(options);
  const results = options.statements.map((item, i) => ({
    name: item.name ?? `#${i}`,
    diagnostics: lintStatement(item.query, schema),
  }));
  process.stdout.write(JSON.stringify(results) + '\n');
}

main(process.argv.slice(2));
