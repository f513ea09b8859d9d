-- Included by roles.sql and rls.sql (psql's \ir): sets :daemon, the role that runs batchd, when the caller
-- gave no -v daemon=NAME.

\if :{?daemon}
\else
    -- The daemon the last run of roles.sql recorded (batchd.daemon_roles), so that a run without -v daemon
    -- does not hand the daemon's place to another role; else the default.
    SELECT to_regclass('batchd.daemon_roles') IS NOT NULL AS batchd_has_daemon_roles \gset
    \if :batchd_has_daemon_roles
        SELECT count(*) > 1 AS batchd_daemons_ambiguous FROM batchd.daemon_roles \gset
        \if :batchd_daemons_ambiguous
            DO $$ BEGIN
                RAISE EXCEPTION 'batchd.daemon_roles names more than one role (%): '
                                'say which runs batchd with -v daemon=NAME',
                    (SELECT string_agg(role_name, ', ' ORDER BY role_name) FROM batchd.daemon_roles);
            END $$;
        \endif
        SELECT coalesce(min(role_name), 'batchd_daemon') AS daemon FROM batchd.daemon_roles \gset
    \else
        \set daemon batchd_daemon
    \endif
\endif
