-- Endpoints managed through the API, the API's keys, and endpoint recoveries.
-- Tables are unqualified: they land in the first schema of the connection's search_path
-- (a dedicated database, or ?search_path=hookline in registry.database_url).

-- Names and tenants compare byte-wise (COLLATE "C"), as the API's cursors do.
CREATE TABLE endpoints (
    name text COLLATE "C" PRIMARY KEY,
    tenant text COLLATE "C",
    url text NOT NULL,
    events text[] NOT NULL,
    filter jsonb,
    -- Header names, each with its value sealed like a secret (values may be credentials).
    headers jsonb NOT NULL DEFAULT '{}'::jsonb,
    timeout_s double precision,
    max_in_flight integer,
    rate_limit_per_s double precision,
    description text,
    metrics_detail boolean NOT NULL DEFAULT false,
    paused boolean NOT NULL DEFAULT false,
    -- Newest first: [{"sealed": "v1.<key id>.<...>", "expires_at": null | epoch seconds}]
    secrets jsonb NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    -- A recovery never reaches back before this: when the endpoint was first created by
    -- its tenant. What was dead-lettered under the name before (another tenant's endpoint,
    -- or a config-file endpoint since removed) is not this endpoint's.
    recover_after timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Rows written with plain SQL must still have the shapes readers rely on.
    CHECK (jsonb_typeof(secrets) = 'array' AND jsonb_array_length(secrets) > 0),
    CHECK (jsonb_typeof(headers) = 'object'),
    CHECK (filter IS NULL OR jsonb_typeof(filter) = 'object')
);

CREATE INDEX endpoints_by_tenant ON endpoints (tenant, name);

-- Every committed change tells the workers which endpoint changed; they re-read it.
CREATE FUNCTION endpoints_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The table's own schema, whatever the writing session's search_path.
    PERFORM pg_notify('hookline_endpoints_' || TG_TABLE_SCHEMA, COALESCE(NEW.name, OLD.name));
    RETURN NULL;
END
$$;

CREATE TRIGGER endpoints_changed AFTER INSERT OR UPDATE OR DELETE ON endpoints
    FOR EACH ROW EXECUTE FUNCTION endpoints_notify();

CREATE TABLE api_keys (
    id text PRIMARY KEY,
    hash bytea NOT NULL,
    tenant text,
    admin boolean NOT NULL DEFAULT false,
    description text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CHECK (admin OR tenant IS NOT NULL)
);

-- A deleted endpoint's name stays its tenant's: another tenant taking it would receive the
-- old endpoint's retries still waiting in the delay queues, and could recover its dead
-- letters. (An admin key may reuse it.)
CREATE TABLE deleted_names (
    name text COLLATE "C" PRIMARY KEY,
    tenant text COLLATE "C",
    recover_after timestamptz NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recoveries (
    id text PRIMARY KEY,
    endpoint text COLLATE "C" NOT NULL,
    tenant text COLLATE "C",
    since timestamptz NOT NULL,
    until timestamptz,
    rate_per_s double precision,
    status text NOT NULL,
    replayed integer NOT NULL DEFAULT 0,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Written every few seconds while it runs: a "running" recovery whose heartbeat
    -- stopped belongs to an API process that is gone.
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE INDEX recoveries_running ON recoveries (tenant) WHERE status = 'running';
