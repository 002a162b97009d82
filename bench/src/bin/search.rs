//! `leadflow-search-bench`: lead search at a million leads. Fills a scratch database with generated leads (SQL
//! `generate_series`, in batches), inquiries, enrollments and lists, then times each filter's first page and a
//! deep cursor page through the API's own query text ([`leadflow_api::leads::search::page_sql`]), with the plan
//! PostgreSQL chose (`EXPLAIN (ANALYZE)`). Prints a Markdown table; docs/benchmarks.md has the figures.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::Value;

use leadflow_api::leads::search::{self, PageRequest};
use leadflow_shared::config::{Config, Source};
use leadflow_shared::lead_filter::{self, LeadFilter, Sort};

#[derive(Parser)]
#[command(name = "leadflow-search-bench", about = "Lead search timings at a million leads")]
struct Args {
    /// The server (any database on it); the scratch database is created next to it.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// The scratch database.
    #[arg(long, default_value = "lf_search_bench")]
    database: String,
    /// How many leads to generate.
    #[arg(long, default_value_t = 1_000_000)]
    leads: i64,
    /// Keep the database afterwards; a later run with the same --leads reuses it instead of filling it again.
    #[arg(long)]
    keep: bool,
    /// Timed runs of each query (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// How many matching rows the deep cursor page starts after (at most half the matches).
    #[arg(long, default_value_t = 100_000)]
    deep: i64,
    /// Leads per page.
    #[arg(long, default_value_t = 50)]
    limit: i64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("search-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("search-bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database replaced.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).context("BENCH_DATABASE_URL is not a URL")?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args
        .database
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        anyhow::bail!("--database must be lower-case letters, digits and _");
    }
    let admin = connect(&args.admin_url).await?;
    let url = with_database(&args.admin_url, &args.database)?;
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&args.database])
        .await?
        .is_some();
    let mut reuse = false;
    if exists && args.keep {
        let db = connect(&url).await?;
        let count: Option<i64> = match db.query_one("SELECT count(*) FROM leads", &[]).await {
            Ok(row) => Some(row.get(0)),
            Err(_) => None,
        };
        reuse = count == Some(args.leads);
        if reuse {
            eprintln!("search-bench: reusing {} with {} leads", args.database, args.leads);
        }
    }
    if !reuse {
        for statement in ["DROP DATABASE IF EXISTS {} WITH (FORCE)", "CREATE DATABASE {}"] {
            admin
                .batch_execute(&statement.replace("{}", &args.database))
                .await
                .context("failed to create the scratch database")?;
        }
        let config = Config::load(&Source::from_pairs([("LEADFLOW_DATABASE_URL", url.as_str())]))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let pool = leadflow_shared::db::pool(&config.database)?;
        leadflow_shared::db::migrate(&pool).await.context("failed to migrate")?;
        pool.close();
        let db = connect(&url).await?;
        fill(&db, args.leads).await?;
    }
    let db = connect(&url).await?;
    let result = measure(&db, &args).await;
    drop(db);
    if !args.keep {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", args.database))
            .await
            .context("failed to drop the scratch database")?;
    }
    result
}

/// Generated leads: names, cities, companies, phones, tags, agents, sources, statuses, professions, countries and
/// scores spread by a hash of the row number; creation times 30 s apart.
const LEADS: &str = "
INSERT INTO leads (email, first_name, last_name, city, company_name, phones, tags, agent, source, original_source,
                   status, profession, region, country, language, score, temperature, is_customer, do_not_call,
                   created_at, updated_at)
SELECT 'lead' || g || '@' || (ARRAY['example.com', 'mail.test', 'shop.test', 'acme.test'])[1 + g % 4],
       (ARRAY['Anna', 'Ben', 'Clara', 'David', 'Emma', 'Felix', 'Greta', 'Hans', 'Ida', 'Jonas', 'Karla', 'Lukas',
              'Mia', 'Noah', 'Olga', 'Paul', 'Rosa', 'Sven', 'Tina', 'Uwe', 'Vera', 'Willi', 'Yara', 'Zoe',
              'Maria', 'Peter', 'Laura', 'Jan', 'Lena', 'Tom'])[1 + h % 30],
       (ARRAY['Schmidt', 'Mueller', 'Schneider', 'Fischer', 'Weber', 'Meyer', 'Wagner', 'Becker', 'Schulz',
              'Hoffmann', 'Koch', 'Richter', 'Klein', 'Wolf', 'Neumann', 'Schwarz', 'Braun', 'Zimmermann',
              'Hartmann', 'Krueger', 'Lange', 'Werner', 'Krause', 'Lehmann', 'Koehler', 'Maier', 'Huber',
              'Kaiser', 'Fuchs', 'Peters', 'Scholz', 'Moeller', 'Weiss', 'Jung', 'Hahn', 'Vogel', 'Keller',
              'Roth', 'Frank', 'Berger'])[1 + (h >> 5) % 40],
       (ARRAY['Berlin', 'Hamburg', 'Munich', 'Cologne', 'Frankfurt', 'Stuttgart', 'Dusseldorf', 'Leipzig',
              'Dortmund', 'Essen', 'Bremen', 'Dresden', 'Hanover', 'Nuremberg', 'Duisburg', 'Bochum', 'Wuppertal',
              'Bielefeld', 'Bonn', 'Muenster', 'Vienna', 'Graz', 'Linz', 'Zurich', 'Geneva', 'Basel', 'Paris',
              'Lyon', 'London', 'Leeds', 'Amsterdam', 'Utrecht', 'Warsaw', 'Krakow', 'Prague', 'Brno', 'Madrid',
              'Lisbon', 'Rome', 'Milan', 'Oslo', 'Bergen', 'Stockholm', 'Malmo', 'Copenhagen', 'Aarhus',
              'Helsinki', 'Tallinn', 'Riga', 'Vilnius'])[1 + (h >> 11) % 50],
       CASE WHEN g % 4 = 0 THEN NULL ELSE 'Company ' || (h >> 3) % 20000 END,
       ARRAY['+49 30 ' || lpad(g::text, 8, '0')],
       CASE WHEN g % 20 = 0 THEN '{vip}'::text[] WHEN g % 7 = 0 THEN '{fair,newsletter}'::text[]
            ELSE '{}'::text[] END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'Agent ' || (1 + (h >> 7) % 20) END,
       src, src,
       CASE WHEN g % 10 = 0 THEN 'Inactive' ELSE 'Active' END,
       (ARRAY['Engineer', 'Teacher', 'Designer', 'Nurse', 'Lawyer', 'Student', 'Manager', 'Farmer'])
           [1 + (h >> 13) % 8],
       (ARRAY['North', 'South', 'East', 'West'])[1 + (h >> 17) % 4],
       (ARRAY['DE', 'DE', 'DE', 'AT', 'CH', 'FR', 'GB', 'PL'])[1 + (h >> 19) % 8],
       (ARRAY['de', 'de-DE', 'de', 'de-AT', 'de-CH', 'fr', 'en', 'pl'])[1 + (h >> 19) % 8],
       score,
       CASE WHEN score >= 80 THEN 'hot' WHEN score >= 40 THEN 'warm' ELSE 'cold' END,
       g % 9 = 0, g % 50 = 0,
       at, at + ((h >> 2) % 100000) * interval '1 minute'
FROM (SELECT g, h,
             (ARRAY['Google', 'Bing', 'Yahoo', 'web form', 'checkout', 'import', 'api', 'New prospect'])
                 [1 + (h >> 23) % 8] AS src,
             ((h >> 3) % 1000) / 10.0 AS score,
             timestamptz '2025-01-01 00:00:00+00' + g * interval '30 seconds' AS at
        FROM (SELECT g, hashint4(g::int)::bigint & 2147483647 AS h FROM generate_series($1::bigint, $2::bigint) g) r) s";

/// An inquiry for every third lead, follow-up data spread over the states; every tenth lead enrolled in one of
/// three campaigns.
const INQUIRIES: &str = "
INSERT INTO inquiries (lead_id, subject, follow_up_status, email_status, processed_order)
SELECT id, 'checkout:' || id,
       (ARRAY['none', 'scheduled', 'in progress', 'completed', 'stopped'])[1 + (id / 3) % 5],
       (ARRAY['sent', 'sent', 'sent', 'bounced', 'failed'])[1 + (id / 7) % 5],
       CASE WHEN id % 27 = 0 THEN 'o-' || id END
  FROM leads WHERE id % 3 = 0 AND id BETWEEN $1 AND $2;
";
const ENROLLMENTS: &str = "
INSERT INTO enrollments (lead_id, campaign_id, subject, status)
SELECT l.id, c.id, 'checkout:' || l.id, 'completed'
  FROM leads l JOIN campaigns c ON c.name = (ARRAY['spring-sale', 'winter-nurture', 'trial'])[1 + (l.id / 10) % 3]
 WHERE l.id % 10 = 0 AND l.id BETWEEN $1 AND $2";

async fn fill(db: &tokio_postgres::Client, leads: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    db.batch_execute(
        "INSERT INTO agents (name) SELECT 'Agent ' || g FROM generate_series(1, 20) g;
         INSERT INTO campaigns (name, status) VALUES ('spring-sale', 'inactive'), ('winter-nurture', 'inactive'),
                                                     ('trial', 'inactive');",
    )
    .await
    .context("failed to add agents and campaigns")?;
    const BATCH: i64 = 100_000;
    let mut from = 1;
    while from <= leads {
        let to = (from + BATCH - 1).min(leads);
        let batch = Instant::now();
        db.execute(LEADS, &[&from, &to])
            .await
            .context("failed to insert leads")?;
        // Lead ids follow the row numbers in a fresh database.
        db.execute(INQUIRIES, &[&from, &to])
            .await
            .context("failed to insert inquiries")?;
        db.execute(ENROLLMENTS, &[&from, &to])
            .await
            .context("failed to insert enrollments")?;
        eprintln!(
            "search-bench: {to} leads ({:.0} leads/s in this batch, with inquiries and enrollments)",
            (to - from + 1) as f64 / batch.elapsed().as_secs_f64()
        );
        from = to + 1;
    }
    db.batch_execute(
        "INSERT INTO lead_lists (name, kind, description) VALUES ('bench-vip', 'static', 'every 100th lead');
         INSERT INTO lead_list_members (list_id, lead_id)
         SELECT (SELECT id FROM lead_lists WHERE name = 'bench-vip'), id FROM leads WHERE id % 100 = 0;
         INSERT INTO lead_lists (name, kind, filter) VALUES
             ('bench-hot-berlin', 'segment', '{\"temperature\": \"hot\", \"city\": \"Berlin\"}');",
    )
    .await
    .context("failed to add lists")?;
    eprintln!(
        "search-bench: filled in {:.0} s; vacuum and analyze",
        started.elapsed().as_secs_f64()
    );
    db.batch_execute("VACUUM ANALYZE").await.context("failed to vacuum")?;
    Ok(())
}

/// One timed search.
struct Case {
    label: String,
    pairs: Vec<(String, String)>,
    sort: Option<&'static str>,
}

fn case(label: &str, pairs: &[(&str, &str)], sort: Option<&'static str>) -> Case {
    Case {
        label: label.to_string(),
        pairs: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        sort,
    }
}

fn cases(leads: i64) -> Vec<Case> {
    let some = (leads * 7 / 9).max(1);
    let exact_email = format!(
        "lead{some}@{}",
        ["example.com", "mail.test", "shop.test", "acme.test"][(some % 4) as usize]
    );
    let phone = format!("+49 30 {:08}", some);
    let order = format!("o-{}", (leads / 2 / 27).max(1) * 27);
    let fragment = format!("lead{}", some / 10);
    let week_from = "2025-03-01";
    let week_to = "2025-03-07";
    vec![
        case("(none), newest first", &[], None),
        case("(none)", &[], Some("score:desc")),
        case("(none)", &[], Some("last_name:asc")),
        case("(none)", &[], Some("email:asc")),
        case("(none)", &[], Some("updated_at:desc")),
        case(
            "created_from/created_to (one week)",
            &[("created_from", week_from), ("created_to", week_to)],
            None,
        ),
        case("name=schmidt", &[("name", "schmidt")], None),
        case("name=anna schmidt", &[("name", "anna schmidt")], None),
        case("email=<exact address>", &[("email", &exact_email)], None),
        case("email=<fragment>", &[("email", &fragment)], None),
        case("phone=<number>", &[("phone", &phone)], None),
        case("tag=vip", &[("tag", "vip")], None),
        case("agent=Agent 7", &[("agent", "Agent 7")], None),
        case("source=Yahoo", &[("source", "Yahoo")], None),
        case("status=Inactive", &[("status", "Inactive")], None),
        case("profession=nurse", &[("profession", "nurse")], None),
        case("city=berlin", &[("city", "berlin")], None),
        case("country=PL", &[("country", "PL")], None),
        case("company=Company 1234", &[("company", "Company 1234")], None),
        case("q=vienna", &[("q", "vienna")], None),
        case("score_min=95", &[("score_min", "95")], Some("score:desc")),
        case("temperature=hot", &[("temperature", "hot")], None),
        case("campaign=trial", &[("campaign", "trial")], None),
        case("follow_up_status=stopped", &[("follow_up_status", "stopped")], None),
        case("email_status=bounced", &[("email_status", "bounced")], None),
        case("processed_order=<order id>", &[("processed_order", &order)], None),
        case("list=<static, 1%>", &[("list", "bench-vip")], None),
        case("list=<segment hot+Berlin>", &[("list", "bench-hot-berlin")], None),
        case("is_customer=true", &[("is_customer", "true")], None),
        case(
            "city+profession+temperature",
            &[("city", "Hamburg"), ("profession", "Nurse"), ("temperature", "hot")],
            None,
        ),
    ]
}

/// What one case measured.
struct Row {
    label: String,
    sort: String,
    matches: i64,
    first_ms: f64,
    deep_ms: Option<f64>,
    deep_at: i64,
    plan: String,
    plan_ms: f64,
}

async fn measure(db: &tokio_postgres::Client, args: &Args) -> anyhow::Result<()> {
    let settings = db
        .query_one(
            "SELECT current_setting('server_version'), current_setting('shared_buffers'), current_setting('work_mem')",
            &[],
        )
        .await?;
    let leads: i64 = db.query_one("SELECT count(*) FROM leads", &[]).await?.get(0);
    let size: String = db
        .query_one("SELECT pg_size_pretty(pg_total_relation_size('leads'))", &[])
        .await?
        .get(0);
    println!(
        "PostgreSQL {} (shared_buffers {}, work_mem {}); {leads} leads, table with indexes {size}; median of {} runs, \
         {} leads per page\n",
        settings.get::<_, String>(0),
        settings.get::<_, String>(1),
        settings.get::<_, String>(2),
        args.repeat,
        args.limit
    );
    // Segments are resolved through a pooled client, as the API does.
    let config = Config::load(&Source::from_pairs([(
        "LEADFLOW_DATABASE_URL",
        with_database(&args.admin_url, &args.database)?.as_str(),
    )]))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pool = leadflow_shared::db::pool(&config.database)?;
    let pooled = pool.get().await.context("failed to connect the pool")?;

    let mut rows = Vec::new();
    for case in cases(leads) {
        let mut filter = LeadFilter::from_pairs(&case.pairs).map_err(|e| anyhow::anyhow!("{}: {e}", case.label))?;
        filter.resolve_lists(&pooled).await?;
        let sort = match case.sort {
            Some(s) => Sort::parse(s).map_err(|e| anyhow::anyhow!("{e}"))?,
            None => Sort::default(),
        };
        let first = PageRequest {
            sort,
            limit: args.limit,
            cursor: None,
        };
        let (condition, params) = filter.to_sql(1);
        let matches: i64 = db
            .query_one(
                &format!("SELECT count(*) FROM leads l WHERE {condition}"),
                &lead_filter::param_refs(&params),
            )
            .await?
            .get(0);
        let (first_ms, plan, plan_ms) = time_page(db, &filter, &first, args.repeat).await?;
        let deep_at = args.deep.min(matches / 2);
        let deep_ms = if deep_at >= 1_000 {
            let mut params = params;
            params.push(Box::new(deep_at - 1));
            let row = db
                .query_one(
                    &format!(
                        "SELECT l.id AS id, {} FROM leads l WHERE {condition} ORDER BY {} OFFSET ${} LIMIT 1",
                        sort.select_key(),
                        sort.order_by(),
                        params.len()
                    ),
                    &lead_filter::param_refs(&params),
                )
                .await?;
            let cursor = sort
                .decode_cursor(&sort.cursor_after(&row)?)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let deep = PageRequest {
                sort,
                limit: args.limit,
                cursor: Some(cursor),
            };
            Some(time_page(db, &filter, &deep, args.repeat).await?.0)
        } else {
            None
        };
        eprintln!("search-bench: {} ({sort}): {first_ms:.1} ms", case.label);
        rows.push(Row {
            label: case.label,
            sort: sort.to_string(),
            matches,
            first_ms,
            deep_ms,
            deep_at,
            plan,
            plan_ms,
        });
    }
    println!(
        "| filter | sort | matches | first page | page after {} rows | plan (first page) | executor |",
        args.deep
    );
    println!("| --- | --- | ---: | ---: | ---: | --- | ---: |");
    for r in rows {
        let deep = match r.deep_ms {
            Some(ms) if r.deep_at == args.deep => format!("{ms:.1} ms"),
            Some(ms) => format!("{ms:.1} ms (after {})", r.deep_at),
            None => "-".into(),
        };
        println!(
            "| {} | {} | {} | {:.1} ms | {} | {} | {:.1} ms |",
            r.label, r.sort, r.matches, r.first_ms, deep, r.plan, r.plan_ms
        );
    }
    Ok(())
}

/// The median wall time of the page query (sent as the API sends it), and the plan with its execution time.
async fn time_page(
    db: &tokio_postgres::Client,
    filter: &LeadFilter,
    request: &PageRequest,
    repeat: usize,
) -> anyhow::Result<(f64, String, f64)> {
    let (sql, params) = search::page_sql(filter, request);
    let refs = lead_filter::param_refs(&params);
    let explained = db
        .query_one(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}"), &refs)
        .await
        .context("failed to explain")?;
    let plan: Value = explained.get(0);
    let plan_ms = plan[0]["Execution Time"].as_f64().unwrap_or(f64::NAN);
    let mut summary = Vec::new();
    let root = &plan[0]["Plan"];
    summarise(page_plan(root).unwrap_or(root), &mut summary);
    summary.dedup();
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let started = Instant::now();
        db.query(&sql, &refs).await.context("failed to run the page query")?;
        times.push(started.elapsed());
    }
    times.sort();
    let median: Duration = times[times.len() / 2];
    Ok((median.as_secs_f64() * 1000.0, summary.join(", "), plan_ms))
}

/// The plan of the inner query choosing the page's ids (the rest reads 50 rows by primary key).
fn page_plan(node: &Value) -> Option<&Value> {
    // The outer query has no LIMIT: the first one is the page's.
    if node["Node Type"] == "Limit" {
        return Some(node);
    }
    node["Plans"].as_array().into_iter().flatten().find_map(page_plan)
}

/// The scans of a plan (leaves first): `Index Scan Backward leads_by_created`, `Seq Scan leads`, ...; the
/// per-row consent look-up of the select list (suppressions) is left out.
fn summarise(node: &Value, out: &mut Vec<String>) {
    for child in node["Plans"].as_array().into_iter().flatten() {
        if child["Parent Relationship"] == "SubPlan" && child.to_string().contains("suppressions") {
            continue;
        }
        summarise(child, out);
    }
    let kind = node["Node Type"].as_str().unwrap_or_default();
    let backward = if node["Scan Direction"] == "Backward" {
        " Backward"
    } else {
        ""
    };
    if let Some(index) = node["Index Name"].as_str() {
        out.push(format!("{kind}{backward} {index}"));
    } else if kind == "Seq Scan" {
        out.push(format!(
            "Seq Scan {}",
            node["Relation Name"].as_str().unwrap_or_default()
        ));
    } else if matches!(
        kind,
        "Hash Join" | "Nested Loop" | "Merge Join" | "Sort" | "Incremental Sort"
    ) {
        let semi = node["Join Type"]
            .as_str()
            .filter(|j| *j != "Inner")
            .map(|j| format!(" ({j})"))
            .unwrap_or_default();
        out.push(format!("{kind}{semi}"));
    }
}
