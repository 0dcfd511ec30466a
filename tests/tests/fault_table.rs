//! docs/faults.md names, for each fault, the test that holds runctl to it: every test it
//! names must exist, so the table cannot claim a test that was renamed or removed.

use tests::repo_root;

#[test]
fn the_fault_table_names_only_tests_that_exist() {
    let root = repo_root();
    let table = std::fs::read_to_string(root.join("docs/faults.md")).expect("docs/faults.md");
    let mut named = 0;
    for cell in table.split('`') {
        let Some((file, test)) = cell.split_once("::") else {
            continue;
        };
        if !file.ends_with(".rs") {
            continue;
        }
        let path = if file.contains('/') {
            root.join(file)
        } else {
            root.join("tests/tests").join(file)
        };
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("docs/faults.md names {}: {e}", path.display()));
        assert!(
            source.contains(&format!("fn {test}(")),
            "docs/faults.md names {file}::{test}, which does not exist"
        );
        named += 1;
    }
    assert!(
        named >= 30,
        "only {named} tests named: is the table still there?"
    );
}
