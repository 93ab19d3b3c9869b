//! The embedded [`StateStore`]: one SQLite file, `state_dir/state.db`, in WAL mode so the admin
//! commands and a running keygate read and write it side by side.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::authenticate::store::Issued;

use super::{ApprovalRow, ApprovalState, Charge, Freeze, Spent, StateError, StateStore};

/// The SQLite store; one connection behind a mutex, since every operation is short.
pub struct Sqlite {
    conn: Mutex<Connection>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS freezes (
    scope TEXT PRIMARY KEY,          -- '*' for everything, else the agent's name
    by TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS budgets (
    agent TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    decided_by TEXT,
    reason TEXT,
    created INTEGER NOT NULL,
    decided INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    lease INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS approved_tokens (
    route TEXT NOT NULL,
    token_id TEXT NOT NULL,
    PRIMARY KEY (route, token_id)
);
CREATE TABLE IF NOT EXISTS source_state (
    key TEXT PRIMARY KEY,            -- 'oauth2/NAME/refresh_token'
    value TEXT NOT NULL
);
";

impl Sqlite {
    /// Opens (creating if needed) `dir/state.db`, setting the dir to 0700 and the file to 0600
    /// and creating the tables.
    pub fn open(dir: &Path) -> Result<Sqlite, StateError> {
        let path = dir.join("state.db");
        let err = |e: &dyn std::fmt::Display| StateError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err(&e))?;
        let conn = Connection::open(&path).map_err(|e| err(&e))?;
        // Owner only: the store names agents, people and pending requests.
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| err(&e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| err(&e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| err(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| err(&e))?;
        // Stores made before `keygate run` have no lease column; ADD COLUMN keeps their rows.
        let has_lease: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('tokens') WHERE name = 'lease'")
            .and_then(|mut st| st.exists([]))
            .map_err(|e| err(&e))?;
        if !has_lease {
            conn.execute_batch("ALTER TABLE tokens ADD COLUMN lease INTEGER NOT NULL DEFAULT 0")
                .map_err(|e| err(&e))?;
        }
        Ok(Sqlite {
            conn: Mutex::new(conn),
            path,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|e| StateError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
}

impl StateStore for Sqlite {
    fn location(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn freezes(&self) -> Result<Vec<Freeze>, StateError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT scope, by, at FROM freezes ORDER BY scope")?;
            let rows = st.query_map([], |r| {
                let scope: String = r.get(0)?;
                Ok(Freeze {
                    agent: (scope != "*").then_some(scope),
                    by: r.get(1)?,
                    at: r.get::<_, i64>(2)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    fn set_freeze(&self, agent: Option<&str>, on: bool, by: &str) -> Result<(), StateError> {
        let scope = agent.unwrap_or("*");
        self.with(|c| {
            match (on, agent) {
                (true, _) => c.execute(
                    "INSERT OR REPLACE INTO freezes (scope, by, at) VALUES (?1, ?2, ?3)",
                    params![scope, by, super::now() as i64],
                )?,
                (false, Some(_)) => {
                    c.execute("DELETE FROM freezes WHERE scope = ?1", params![scope])?
                }
                (false, None) => c.execute("DELETE FROM freezes", [])?,
            };
            Ok(())
        })
    }

    fn spent(&self) -> Result<Vec<Spent>, StateError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT agent, window_start, tokens FROM budgets")?;
            let rows = st.query_map([], |r| {
                Ok(Spent {
                    agent: r.get(0)?,
                    window_start: r.get::<_, i64>(1)? as u64,
                    tokens: r.get::<_, i64>(2)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    fn save_spent(&self, spent: &[Spent]) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            for s in spent {
                tx.execute(
                    "INSERT OR REPLACE INTO budgets (agent, window_start, tokens) VALUES (?1, ?2, ?3)",
                    params![s.agent, s.window_start as i64, s.tokens as i64],
                )?;
            }
            tx.commit()
        })
    }

    fn charge(
        &self,
        agent: &str,
        window_start: u64,
        limit: u64,
        tokens: u64,
    ) -> Result<Charge, StateError> {
        self.with(|c| {
            // IMMEDIATE takes the write lock before the read, so two keygates sharing the file
            // cannot both read the same total and both charge.
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT window_start, tokens FROM budgets WHERE agent = ?1",
                    params![agent],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let current = match row {
                Some((start, t)) if start as u64 == window_start => t as u64,
                _ => 0,
            };
            let total = current.saturating_add(tokens);
            if total > limit {
                return Ok(Charge::Over(current));
            }
            tx.execute(
                "INSERT OR REPLACE INTO budgets (agent, window_start, tokens) VALUES (?1, ?2, ?3)",
                params![agent, window_start as i64, total as i64],
            )?;
            tx.commit()?;
            Ok(Charge::Charged(total))
        })
    }

    fn put_approval(&self, row: &ApprovalRow) -> Result<(), StateError> {
        let request = row.request.to_string();
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO approvals (id, state, request, decided_by, reason, created, decided)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    row.id,
                    row.state.as_str(),
                    request,
                    row.decided_by,
                    row.reason,
                    row.created as i64,
                    row.decided.map(|d| d as i64)
                ],
            )?;
            Ok(())
        })
    }

    fn approvals(&self, limit: usize) -> Result<Vec<ApprovalRow>, StateError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, state, request, decided_by, reason, created, decided FROM approvals
                 ORDER BY created DESC LIMIT ?1",
            )?;
            let rows = st.query_map(params![limit as i64], |r| {
                let state: String = r.get(1)?;
                let request: String = r.get(2)?;
                Ok(ApprovalRow {
                    id: r.get(0)?,
                    state: ApprovalState::parse(&state),
                    request: serde_json::from_str(&request).unwrap_or_default(),
                    decided_by: r.get(3)?,
                    reason: r.get(4)?,
                    created: r.get::<_, i64>(5)? as u64,
                    decided: r.get::<_, Option<i64>>(6)?.map(|d| d as u64),
                })
            })?;
            rows.collect()
        })
    }

    fn approve_token(&self, route: &str, token_id: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO approved_tokens (route, token_id) VALUES (?1, ?2)",
                params![route, token_id],
            )?;
            Ok(())
        })
    }

    fn tokens(&self) -> Result<Vec<Issued>, StateError> {
        self.tokens_impl()
    }

    fn add_token(&self, token: &Issued) -> Result<(), StateError> {
        self.add_token_impl(token)
    }

    fn revoke_tokens(&self, id: Option<&str>, agent: Option<&str>) -> Result<usize, StateError> {
        self.revoke_tokens_impl(id, agent)
    }

    fn tokens_revision(&self) -> Result<u64, StateError> {
        self.tokens_revision_impl()
    }

    fn approved_tokens(&self) -> Result<Vec<(String, String)>, StateError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT route, token_id FROM approved_tokens")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    fn source_state(&self, key: &str) -> Result<Option<String>, StateError> {
        self.with(|c| {
            use rusqlite::OptionalExtension;
            c.query_row(
                "SELECT value FROM source_state WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn put_source_state(&self, key: &str, value: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO source_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
    }
}

/// Bumps the token revision inside the writer's transaction.
fn bump_tokens(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('tokens_rev', 1)
         ON CONFLICT(key) DO UPDATE SET value = value + 1",
        [],
    )?;
    Ok(())
}

impl Sqlite {
    pub(crate) fn tokens_impl(&self) -> Result<Vec<Issued>, StateError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, agent, sha256, created, expires, revoked, lease FROM tokens ORDER BY created, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Issued {
                    id: r.get(0)?,
                    agent: r.get(1)?,
                    sha256: r.get(2)?,
                    created: r.get::<_, i64>(3)? as u64,
                    expires: r.get::<_, i64>(4)? as u64,
                    revoked: r.get::<_, i64>(5)? != 0,
                    lease: r.get::<_, i64>(6)? != 0,
                })
            })?;
            rows.collect()
        })
    }

    pub(crate) fn add_token_impl(&self, t: &Issued) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Expired tokens are dropped as new ones are issued, so the table does not grow
            // forever.
            tx.execute(
                "DELETE FROM tokens WHERE expires <= ?1",
                params![super::now() as i64],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO tokens (id, agent, sha256, created, expires, revoked, lease)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    t.id,
                    t.agent,
                    t.sha256,
                    t.created as i64,
                    t.expires as i64,
                    i64::from(t.revoked),
                    i64::from(t.lease)
                ],
            )?;
            bump_tokens(&tx)?;
            tx.commit()
        })
    }

    pub(crate) fn revoke_tokens_impl(
        &self,
        id: Option<&str>,
        agent: Option<&str>,
    ) -> Result<usize, StateError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE tokens SET revoked = 1 WHERE revoked = 0 AND (id = ?1 OR agent = ?2)",
                params![id, agent],
            )?;
            bump_tokens(&tx)?;
            tx.commit()?;
            Ok(n)
        })
    }

    pub(crate) fn tokens_revision_impl(&self) -> Result<u64, StateError> {
        self.with(|c| {
            let v: Option<i64> = c
                .query_row("SELECT value FROM meta WHERE key = 'tokens_rev'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_from_before_leases_keeps_its_tokens_and_gains_the_lease_flag() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("state.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE tokens (id TEXT PRIMARY KEY, agent TEXT NOT NULL, sha256 TEXT NOT NULL,
                 created INTEGER NOT NULL, expires INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO tokens VALUES ('tok_old', 'coder', 'ab', 1, 99999999999, 0);",
            )
            .unwrap();
        }
        let s = Sqlite::open(dir.path()).unwrap();
        let t = s.tokens().unwrap();
        assert_eq!(t.len(), 1);
        assert!(t[0].id == "tok_old" && !t[0].lease);
        // Opening it again finds the column there and changes nothing.
        drop(s);
        assert_eq!(Sqlite::open(dir.path()).unwrap().tokens().unwrap().len(), 1);
    }

    #[test]
    fn freezes_budgets_and_approvals_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Sqlite::open(dir.path()).unwrap();
            s.set_freeze(None, true, "alice").unwrap();
            s.set_freeze(Some("coder"), true, "alice").unwrap();
            s.save_spent(&[Spent {
                agent: "coder".into(),
                window_start: 100,
                tokens: 42,
            }])
            .unwrap();
            s.approve_token("anthropic", "tok_abc").unwrap();
        }
        let s = Sqlite::open(dir.path()).unwrap();
        let f = s.freezes().unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(s.spent().unwrap()[0].tokens, 42);
        assert_eq!(
            s.approved_tokens().unwrap(),
            vec![("anthropic".to_string(), "tok_abc".to_string())]
        );
        s.set_freeze(None, false, "alice").unwrap();
        assert!(
            s.freezes().unwrap().is_empty(),
            "unfreeze lifts every freeze"
        );
        let mode = std::fs::metadata(dir.path().join("state.db"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn charge_is_refused_past_the_limit_and_resets_with_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sqlite::open(dir.path()).unwrap();
        assert_eq!(s.charge("a", 10, 100, 60).unwrap(), Charge::Charged(60));
        assert_eq!(s.charge("a", 10, 100, 60).unwrap(), Charge::Over(60));
        assert_eq!(s.charge("a", 10, 100, 40).unwrap(), Charge::Charged(100));
        assert_eq!(s.charge("a", 20, 100, 60).unwrap(), Charge::Charged(60));
    }
}
