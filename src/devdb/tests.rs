//! The embedded server's own tests: start, restart, stop on drop and on
//! SIGKILL, stale postmasters, error reports, the shared test cluster.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::binaries::has_server_binaries;
use super::ownership::{cluster_user, pg_command};
use super::setup::conn_value;
use super::test_cluster::{pid_alive, postmaster_pid, valid_db_name};
use super::*;

/// Fresh short directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!("/tmp/devdb-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn test_options(dir: &Path) -> EmbeddedOptions {
    let mut o = EmbeddedOptions::from_process_env(dir);
    o.durable = false;
    o.max_connections = 20;
    o
}

async fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !pid_alive(pid)
}

#[test]
fn finds_installed_binaries() {
    let dir = find_binaries(None, &test_options(Path::new("/tmp")).search_path)
        .expect("PostgreSQL must be installed for these tests");
    assert!(has_server_binaries(&dir), "{}", dir.display());
}

#[test]
fn helpers_quote_and_validate() {
    assert_eq!(conn_value("/tmp/x"), "/tmp/x");
    assert_eq!(conn_value("/tmp/a b"), "'/tmp/a b'");
    assert_eq!(conn_value("it's"), r"'it\'s'");
    assert!(valid_db_name("test_1"));
    assert!(!valid_db_name(""));
    assert!(!valid_db_name("Robert'); DROP"));
    assert!(!valid_db_name(&"a".repeat(64)));
}

#[tokio::test]
async fn data_survives_restart_and_role_is_unprivileged() {
    let dir = TempDir::new("persist");
    // Production settings: durable, so initdb and checkpoints fsync.
    let options = EmbeddedOptions::from_process_env(&dir.0);
    let t0 = Instant::now();
    let pg = EmbeddedPostgres::start(options.clone()).await.unwrap();
    eprintln!("first start (with initdb): {:?}", t0.elapsed());
    assert!(pg
        .connection_string()
        .contains("user=mana_sync dbname=mana_sync"));

    let c = connect(&pg.connection_string()).await.unwrap();
    let row = c
        .query_one(
            "SELECT rolsuper, rolbypassrls, current_database() \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "mana_sync must not be superuser");
    assert!(!row.get::<_, bool>(1), "mana_sync must not bypass RLS");
    assert_eq!(row.get::<_, String>(2), "mana_sync");
    c.batch_execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept')")
        .await
        .unwrap();
    drop(c);
    let t1 = Instant::now();
    pg.stop().await.unwrap();
    eprintln!("stop: {:?}", t1.elapsed());

    let t2 = Instant::now();
    let pg = EmbeddedPostgres::start(options).await.unwrap();
    eprintln!("second start: {:?}", t2.elapsed());
    let c = connect(&pg.connection_string()).await.unwrap();
    let body: String = c
        .query_one("SELECT body FROM notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "kept");
    drop(c);
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn missing_binaries_are_reported() {
    let dir = TempDir::new("nobin");
    let empty = dir.0.join("empty-bin");
    fs::create_dir_all(&empty).unwrap();
    let mut o = test_options(&dir.0.join("data"));
    o.bin_dir = Some(empty.clone());
    let err = EmbeddedPostgres::start(o).await.unwrap_err();
    assert!(matches!(err, DevDbError::BinariesNotFound(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("Install PostgreSQL"), "{msg}");
    assert!(msg.contains(&empty.display().to_string()), "{msg}");
    assert!(msg.contains("DATABASE_URL"), "{msg}");
}

#[tokio::test]
async fn too_long_socket_path_is_rejected() {
    let long = PathBuf::from("/tmp").join("d".repeat(100));
    let err = EmbeddedPostgres::start(test_options(&long))
        .await
        .unwrap_err();
    assert!(matches!(err, DevDbError::PathTooLong(_)), "{err:?}");
    assert!(err.to_string().contains("shorter data directory"));
    assert!(!long.exists(), "nothing should be created");
}

#[tokio::test]
async fn dropping_stops_postgres() {
    let dir = TempDir::new("drop");
    let pg = EmbeddedPostgres::start(test_options(&dir.0)).await.unwrap();
    let pid = postmaster_pid(pg.pgdata_dir()).unwrap();
    assert!(pid_alive(pid));
    let t = Instant::now();
    drop(pg);
    assert!(
        wait_gone(pid, Duration::from_secs(10)).await,
        "postmaster {pid} survived drop"
    );
    eprintln!("postmaster gone {:?} after drop", t.elapsed());
}

/// Runs only when re-executed by `sigkill_stops_postgres`: starts a
/// server, reports readiness, then waits to be SIGKILLed.
#[test]
fn sigkill_helper() {
    let Some(dir) = std::env::var_os("MANA_SYNC_DEVDB_SIGKILL_HELPER") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pg = EmbeddedPostgres::start(test_options(&dir)).await.unwrap();
        fs::write(dir.join("ready"), b"").unwrap();
        // Holds PostgreSQL until the test SIGKILLs this process.
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(pg);
    });
}

#[tokio::test]
async fn sigkill_stops_postgres() {
    let dir = TempDir::new("kill");
    let module = module_path!().split_once("::").unwrap().1;
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &format!("{module}::sigkill_helper"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MANA_SYNC_DEVDB_SIGKILL_HELPER", &dir.0)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.0.join("ready").exists() {
        assert!(Instant::now() < deadline, "helper did not start postgres");
        assert!(helper.try_wait().unwrap().is_none(), "helper exited early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = postmaster_pid(&dir.0.join("pgdata")).unwrap();
    assert!(pid_alive(pid));
    helper.kill().unwrap(); // SIGKILL: no destructors run
    helper.wait().unwrap();
    let t = Instant::now();
    assert!(
        wait_gone(pid, Duration::from_secs(10)).await,
        "postmaster {pid} survived SIGKILL of its parent"
    );
    eprintln!("postmaster gone {:?} after SIGKILL", t.elapsed());
}

#[tokio::test]
async fn recovers_from_stale_postmaster() {
    let dir = TempDir::new("stale");
    // Create the cluster, then start a server on it behind our back, as
    // if an earlier mana-sync had died leaving its postmaster running.
    EmbeddedPostgres::start(test_options(&dir.0))
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
    let bin = find_binaries(None, &test_options(Path::new("/tmp")).search_path).unwrap();
    let pgdata = dir.0.join("pgdata");
    let user = cluster_user().unwrap();
    let out = pg_command(&bin.join("pg_ctl"), user, &dir.0)
        .arg("start")
        .arg("-D")
        .arg(&pgdata)
        .arg("-l")
        .arg(dir.0.join("stale.log"))
        .arg("-o")
        .arg(format!(
            "-k {} -c listen_addresses=",
            dir.0.join("run").display()
        ))
        .arg("-w")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stale = postmaster_pid(&pgdata).unwrap();
    assert!(pid_alive(stale));

    let pg = EmbeddedPostgres::start(test_options(&dir.0)).await.unwrap();
    assert!(wait_gone(stale, Duration::from_secs(5)).await);
    let fresh = postmaster_pid(&pgdata).unwrap();
    assert_ne!(fresh, stale);
    let c = connect(&pg.connection_string()).await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    drop(c);
    pg.stop().await.unwrap();
    assert!(!pid_alive(fresh));
}

#[tokio::test]
async fn failed_start_reports_log_tail() {
    let dir = TempDir::new("badcfg");
    let mut o = test_options(&dir.0);
    o.extra_settings
        .push(("no_such_setting".into(), "1".into()));
    let err = EmbeddedPostgres::start(o).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DevDbError::Start(_)), "{err:?}");
    assert!(msg.contains("no_such_setting"), "{msg}");
}

#[test]
fn test_cluster_is_shared() {
    let a = test_cluster();
    let b = test_cluster();
    assert!(std::ptr::eq(a, b));
    let name = format!("shared_{}", std::process::id());
    let conn = a.create_database(&name);
    assert!(conn.contains(&format!("dbname={name}")), "{conn}");
    let other = a.fresh_database();
    assert_ne!(conn, other);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = connect(&conn).await.unwrap();
        let row = c
            .query_one(
                "SELECT current_user::text, \
                 (SELECT pg_get_userbyid(datdba)::text FROM pg_database \
                  WHERE datname = current_database()), \
                 (SELECT count(*) FROM pg_tables WHERE schemaname = 'public')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "mana_sync");
        assert_eq!(row.get::<_, String>(1), "mana_sync");
        assert_eq!(row.get::<_, i64>(2), 0);
        // Owner may create tables in its pristine database.
        c.batch_execute("CREATE TABLE t (x int)").await.unwrap();
        let su = connect(&a.superuser_conn_string).await.unwrap();
        su.batch_execute("SELECT 1").await.unwrap();
    });
}
