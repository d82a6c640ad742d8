//! What a SCAP source data stream says about applicability, read so the gate can say *why* a
//! rule did not apply: each rule's platforms (its own and those of the groups around it), each
//! platform's CPE applicability-language test, and the titles of the CPE OVAL definitions those
//! tests name. Which of those definitions held on the scanned root comes from the scan's own
//! ARF results ([`facts`]), so the reasons are `oscap`'s verdicts, not a list of bake's.
//!
//! SSG's data streams are machine-written with stable prefixes (`xccdf-1.2:`, `cpe-lang:`,
//! `oval-def:`), which is what this reader expects; a data stream written otherwise yields no
//! platforms, and every not-applicable rule is then reported with its check as the reason.

use std::collections::{BTreeMap, HashMap};

/// One CPE applicability-language test (`cpe-lang:logical-test` or `check-fact-ref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// A CPE OVAL definition id.
    Fact(String),
    Logical {
        all: bool,
        negate: bool,
        children: Vec<Test>,
    },
}

/// Applicability as the data stream declares it.
#[derive(Debug, Default)]
pub struct Content {
    /// Short rule id → platform ids (without `#`), the outermost group's first.
    rule_platforms: HashMap<String, Vec<String>>,
    /// Platform id → its test.
    platforms: HashMap<String, Test>,
    /// OVAL definition id → title (or its first criterion's comment when the title is empty).
    titles: HashMap<String, String>,
    /// Full XCCDF profile ids.
    profiles: Vec<String>,
}

const RULE_PREFIX: &str = "xccdf_org.ssgproject.content_rule_";

impl Content {
    /// Reads the benchmark's groups, rules and profiles, the platform specification and the OVAL
    /// definition titles of a data stream's text.
    pub fn parse(xml: &str) -> Content {
        let mut content = Content::default();
        content.read_benchmark(xml);
        content.read_platforms(xml);
        content.read_titles(xml);
        content
    }

    /// The full ids of the data stream's XCCDF profiles.
    pub fn profiles(&self) -> &[String] {
        &self.profiles
    }

    /// Whether the benchmark has rule `id` (short form).
    pub fn has_rule(&self, id: &str) -> bool {
        self.rule_platforms.contains_key(id)
    }

    /// The platform ids that rule `id` (short form) and its groups require.
    pub fn platforms_of(&self, id: &str) -> &[String] {
        self.rule_platforms
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Why rule `id` was not applicable, given the CPE OVAL results of its scan: the platforms
    /// that did not hold, each with its test and the verdict of every definition in it.
    pub fn why_not_applicable(&self, id: &str, facts: &HashMap<String, bool>) -> String {
        let mut unmet = Vec::new();
        let mut undecided = Vec::new();
        for platform in self.platforms_of(id) {
            let Some(test) = self.platforms.get(platform) else {
                continue;
            };
            match evaluate(test, facts) {
                Some(false) => unmet.push(format!(
                    "platform `{platform}` is not met: {}",
                    self.describe(test, facts)
                )),
                None => undecided.push(platform.as_str()),
                Some(true) => {}
            }
        }
        if !unmet.is_empty() {
            return unmet.join("; ");
        }
        if !undecided.is_empty() {
            return format!(
                "platform `{}` was not evaluated by the scanner",
                undecided.join("`, `")
            );
        }
        "its check found nothing it applies to on this root".into()
    }

    fn describe(&self, test: &Test, facts: &HashMap<String, bool>) -> String {
        match test {
            Test::Fact(id) => {
                let title = self.titles.get(id).map(String::as_str).unwrap_or(id);
                let verdict = match facts.get(id) {
                    Some(true) => "true",
                    Some(false) => "false",
                    None => "not evaluated",
                };
                format!("({title}: {verdict})")
            }
            Test::Logical {
                all,
                negate,
                children,
            } => {
                let parts: Vec<String> = children.iter().map(|c| self.describe(c, facts)).collect();
                let joined = parts.join(if *all { " and " } else { " or " });
                match (negate, parts.len()) {
                    (false, _) => joined,
                    (true, 1) => format!("not {joined}"),
                    (true, _) => format!("not [{joined}]"),
                }
            }
        }
    }

    fn read_benchmark(&mut self, xml: &str) {
        // Groups nest; a platform element belongs to the innermost open group or rule.
        let mut stack: Vec<Vec<String>> = Vec::new();
        let mut rule: Option<(String, Vec<String>)> = None;
        let Some(start) = xml.find("<xccdf-1.2:Benchmark") else {
            return;
        };
        let end = xml[start..]
            .find("</xccdf-1.2:Benchmark>")
            .map_or(xml.len(), |e| start + e);
        let mut rest = &xml[start..end];
        while let Some(at) = rest.find('<') {
            rest = &rest[at..];
            let tag_end = rest.find('>').map_or(rest.len(), |e| e + 1);
            let tag = &rest[..tag_end];
            if let Some(tag_body) = tag.strip_prefix("<xccdf-1.2:Group") {
                if !tag_body.trim_end().ends_with("/>") {
                    stack.push(Vec::new());
                }
            } else if tag.starts_with("</xccdf-1.2:Group>") {
                stack.pop();
            } else if tag.starts_with("<xccdf-1.2:Rule ") {
                if let Some(id) = attribute(tag, "id") {
                    let id = id.strip_prefix(RULE_PREFIX).unwrap_or(id).to_owned();
                    let inherited: Vec<String> = stack.iter().flatten().cloned().collect();
                    if tag.ends_with("/>") {
                        self.rule_platforms.insert(id, inherited);
                    } else {
                        rule = Some((id, inherited));
                    }
                }
            } else if tag.starts_with("</xccdf-1.2:Rule>") {
                if let Some((id, platforms)) = rule.take() {
                    self.rule_platforms.insert(id, platforms);
                }
            } else if tag.starts_with("<xccdf-1.2:platform ") {
                // The benchmark's own platform (a CPE name) is not a `#` reference.
                if let Some(idref) = attribute(tag, "idref").and_then(|i| i.strip_prefix('#')) {
                    match (&mut rule, stack.last_mut()) {
                        (Some((_, platforms)), _) => platforms.push(idref.to_owned()),
                        (None, Some(group)) => group.push(idref.to_owned()),
                        (None, None) => {}
                    }
                }
            } else if tag.starts_with("<xccdf-1.2:Profile ")
                && let Some(id) = attribute(tag, "id")
            {
                self.profiles.push(id.to_owned());
            }
            rest = &rest[tag_end..];
        }
    }

    fn read_platforms(&mut self, xml: &str) {
        let mut rest = xml;
        while let Some(at) = rest.find("<cpe-lang:platform ") {
            let element = &rest[at..];
            let Some(end) = element.find("</cpe-lang:platform>") else {
                break;
            };
            let body = &element[..end];
            if let Some(id) = attribute(&body[..body.find('>').unwrap_or(body.len())], "id") {
                let mut tokens = Tokens { rest: body };
                tokens.next();
                if let Some(test) = parse_test(&mut tokens) {
                    self.platforms.insert(id.to_owned(), test);
                }
            }
            rest = &element[end..];
        }
    }

    fn read_titles(&mut self, xml: &str) {
        let mut rest = xml;
        while let Some(at) = rest.find("<oval-def:definition ") {
            let element = &rest[at..];
            let end = element
                .find("</oval-def:definition>")
                .unwrap_or(element.len());
            let body = &element[..end];
            let open = &body[..body.find('>').unwrap_or(body.len())];
            if let Some(id) = attribute(open, "id") {
                let title = text_between(body, "<oval-def:title>", "</oval-def:title>")
                    .filter(|t| !t.trim().is_empty())
                    .or_else(|| {
                        let criterion = &body[body.find("<oval-def:criterion ")?..];
                        attribute(&criterion[..criterion.find('>')?], "comment")
                    });
                if let Some(title) = title {
                    self.titles.insert(id.to_owned(), unescape(title.trim()));
                }
            }
            rest = &element[end.min(element.len())..];
            if end == element.len() {
                break;
            }
        }
    }
}

/// A test's value under `facts`; `None` when a definition it needs was not evaluated.
pub fn evaluate(test: &Test, facts: &HashMap<String, bool>) -> Option<bool> {
    match test {
        Test::Fact(id) => facts.get(id).copied(),
        Test::Logical {
            all,
            negate,
            children,
        } => {
            let values: Vec<Option<bool>> = children.iter().map(|c| evaluate(c, facts)).collect();
            let value = if *all {
                if values.contains(&Some(false)) {
                    Some(false)
                } else if values.iter().all(|v| *v == Some(true)) {
                    Some(true)
                } else {
                    None
                }
            } else if values.contains(&Some(true)) {
                Some(true)
            } else if values.iter().all(|v| *v == Some(false)) {
                Some(false)
            } else {
                None
            };
            value.map(|v| v != *negate)
        }
    }
}

/// The verdicts of the OVAL definitions evaluated in an ARF result (`true` or `false`; other
/// results are left out). A definition evaluated in more than one OVAL report keeps the verdict
/// of the report that decided it.
pub fn facts(arf: &str) -> HashMap<String, bool> {
    let mut facts = HashMap::new();
    let mut rest = arf;
    while let Some(at) = rest.find("<definition definition_id=\"") {
        let element = &rest[at..];
        let end = element.find('>').unwrap_or(element.len());
        let tag = &element[..end];
        if let (Some(id), Some(result)) =
            (attribute(tag, "definition_id"), attribute(tag, "result"))
        {
            match result {
                "true" => {
                    facts.insert(id.to_owned(), true);
                }
                "false" => {
                    facts.insert(id.to_owned(), false);
                }
                _ => {}
            }
        }
        rest = &element[end..];
    }
    facts
}

/// Not-applicable rules of a scan with the reason for each (short id → reason).
pub fn reasons<'a>(
    content: &Content,
    facts: &HashMap<String, bool>,
    not_applicable: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, String> {
    not_applicable
        .into_iter()
        .map(|id| (id.to_owned(), content.why_not_applicable(id, facts)))
        .collect()
}

struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Tokens<'a> {
    /// The next tag, skipping text between tags.
    fn next(&mut self) -> Option<&'a str> {
        let at = self.rest.find('<')?;
        let end = self.rest[at..].find('>')? + at + 1;
        let tag = &self.rest[at..end];
        self.rest = &self.rest[end..];
        Some(tag)
    }
}

fn parse_test(tokens: &mut Tokens<'_>) -> Option<Test> {
    let tag = tokens.next()?;
    if tag.starts_with("<cpe-lang:check-fact-ref ") {
        return attribute(tag, "id-ref").map(|id| Test::Fact(id.to_owned()));
    }
    if !tag.starts_with("<cpe-lang:logical-test ") {
        return None;
    }
    let all = attribute(tag, "operator").is_none_or(|o| o.eq_ignore_ascii_case("AND"));
    let negate = attribute(tag, "negate").is_some_and(|n| n == "true");
    let mut children = Vec::new();
    if !tag.ends_with("/>") {
        loop {
            let saved = tokens.rest;
            let next = tokens.next()?;
            if next.starts_with("</cpe-lang:logical-test") {
                break;
            }
            tokens.rest = saved;
            children.push(parse_test(tokens)?);
        }
    }
    Some(Test::Logical {
        all,
        negate,
        children,
    })
}

fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

fn text_between<'a>(body: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = body.find(open)? + open.len();
    let len = body[start..].find(close)?;
    Some(&body[start..start + len])
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DS: &str = r##"<ds:data-stream-collection>
<xccdf-1.2:Benchmark id="b">
  <cpe-lang:platform-specification>
    <cpe-lang:platform id="machine">
      <cpe-lang:logical-test operator="AND" negate="false">
        <cpe-lang:check-fact-ref system="oval" href="cpe-oval.xml" id-ref="oval:ssg-installed_env_is_a_machine:def:1"/>
      </cpe-lang:logical-test>
    </cpe-lang:platform>
    <cpe-lang:platform id="not_container_or_kernel">
      <cpe-lang:logical-test operator="OR" negate="false">
        <cpe-lang:logical-test operator="AND" negate="true">
          <cpe-lang:check-fact-ref system="oval" href="cpe-oval.xml" id-ref="oval:ssg-installed_env_is_a_container:def:1"/>
        </cpe-lang:logical-test>
        <cpe-lang:check-fact-ref system="oval" href="cpe-oval.xml" id-ref="oval:ssg-system_with_kernel:def:1"/>
      </cpe-lang:logical-test>
    </cpe-lang:platform>
  </cpe-lang:platform-specification>
  <xccdf-1.2:platform idref="cpe:/o:debian:debian_linux:12"/>
  <xccdf-1.2:Profile id="xccdf_org.ssgproject.content_profile_cis_level1_server"><xccdf-1.2:title>t</xccdf-1.2:title></xccdf-1.2:Profile>
  <xccdf-1.2:Group id="g1">
    <xccdf-1.2:platform idref="#machine"/>
    <xccdf-1.2:Group id="g2">
      <xccdf-1.2:Rule selected="false" id="xccdf_org.ssgproject.content_rule_partition_for_tmp" severity="low">
        <xccdf-1.2:platform idref="#not_container_or_kernel"/>
      </xccdf-1.2:Rule>
    </xccdf-1.2:Group>
    <xccdf-1.2:Rule id="xccdf_org.ssgproject.content_rule_grub" severity="low"/>
  </xccdf-1.2:Group>
  <xccdf-1.2:Rule id="xccdf_org.ssgproject.content_rule_top" severity="low"></xccdf-1.2:Rule>
</xccdf-1.2:Benchmark>
<oval-def:definition id="oval:ssg-installed_env_is_a_machine:def:1" version="2" class="inventory">
  <oval-def:metadata><oval-def:title>Check if the scan target is a machine</oval-def:title></oval-def:metadata>
</oval-def:definition>
<oval-def:definition id="oval:ssg-installed_env_is_a_container:def:1" version="2" class="inventory">
  <oval-def:metadata><oval-def:title>Check if the scan target is a container &amp; more</oval-def:title></oval-def:metadata>
</oval-def:definition>
<oval-def:definition id="oval:ssg-system_with_kernel:def:1" version="2" class="inventory">
  <oval-def:metadata><oval-def:title/></oval-def:metadata>
  <oval-def:criteria><oval-def:criterion comment="kernel is installed" test_ref="t"/></oval-def:criteria>
</oval-def:definition>
</ds:data-stream-collection>"##;

    const ARF: &str = r#"<arf:asset-report-collection>
<definition definition_id="oval:ssg-installed_env_is_a_container:def:1" result="true" version="2"/>
<definition definition_id="oval:ssg-installed_env_is_a_machine:def:1" result="false" version="2"/>
<definition definition_id="oval:ssg-system_with_kernel:def:1" result="false" version="2"/>
<definition definition_id="oval:ssg-other:def:1" result="not evaluated" version="2"/>
</arf:asset-report-collection>"#;

    #[test]
    fn rules_inherit_the_platforms_of_their_groups() {
        let content = Content::parse(DS);
        assert_eq!(
            content.platforms_of("partition_for_tmp"),
            ["machine", "not_container_or_kernel"]
        );
        assert_eq!(content.platforms_of("grub"), ["machine"]);
        assert!(content.platforms_of("top").is_empty());
        assert!(content.has_rule("top") && !content.has_rule("partition_for_var"));
        assert_eq!(
            content.profiles(),
            ["xccdf_org.ssgproject.content_profile_cis_level1_server"]
        );
    }

    #[test]
    fn the_reason_names_each_unmet_platform_with_the_scanners_verdicts() {
        let content = Content::parse(DS);
        let facts = facts(ARF);
        assert_eq!(facts.len(), 3);
        let why = content.why_not_applicable("partition_for_tmp", &facts);
        assert_eq!(
            why,
            "platform `machine` is not met: (Check if the scan target is a machine: false); \
             platform `not_container_or_kernel` is not met: \
             not (Check if the scan target is a container & more: true) or (kernel is installed: false)"
        );
        assert_eq!(
            content.why_not_applicable("top", &facts),
            "its check found nothing it applies to on this root"
        );
        let none = HashMap::new();
        assert_eq!(
            content.why_not_applicable("grub", &none),
            "platform `machine` was not evaluated by the scanner"
        );
    }

    #[test]
    fn logical_tests_follow_cpe_semantics() {
        let fact = |id: &str| Test::Fact(id.into());
        let facts = HashMap::from([("t".to_owned(), true), ("f".to_owned(), false)]);
        let or = Test::Logical {
            all: false,
            negate: false,
            children: vec![fact("f"), fact("u"), fact("t")],
        };
        assert_eq!(evaluate(&or, &facts), Some(true));
        let and = Test::Logical {
            all: true,
            negate: true,
            children: vec![fact("t"), fact("u")],
        };
        assert_eq!(evaluate(&and, &facts), None);
        let and = Test::Logical {
            all: true,
            negate: true,
            children: vec![fact("f"), fact("u")],
        };
        assert_eq!(evaluate(&and, &facts), Some(true));
    }
}
