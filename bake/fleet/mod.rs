//! The fleet: every recipe under a directory, and the forest their `base: { recipe: … }` links
//! make (a recipe has one base, so each recipe has at most one parent).
//!
//! ```text
//!  DIR ──discover──► *.yaml / *.yml with a top-level `bake:` line
//!      ──load──────► recipes (every error of every file, at once)
//!      ──link──────► parent of each recipe (a base recipe outside DIR joins the fleet)
//!      ──order─────► parents before children, siblings by path: the build and print order
//! ```
//!
//! [`schedule`] builds a fleet in that order with bounded parallelism.

pub mod outdated;
pub mod packages;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::id::Version;
use crate::recipe::{self, Base, Recipe, RecipeErrors, VarSources};
use crate::store::{BuildRecord, Store};

/// Directories never searched for recipes: bake's store, version control, build output.
const SKIPPED_DIRS: &[&str] = &[".bake", ".git", "target", "node_modules"];

/// The recipes under a directory, parents before the recipes built on them.
#[derive(Debug)]
pub struct Fleet {
    pub members: Vec<Member>,
}

#[derive(Debug)]
pub struct Member {
    /// The recipe file as shown to the user (under the directory as it was given).
    pub shown: String,
    pub recipe: Recipe,
    /// The member this one is built on (its `base: { recipe: … }`).
    pub parent: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("failed to read the recipe directory `{}`", dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no recipe in `{}` (a recipe is a .yaml or .yml file with a top-level `bake:` key)", dir.display())]
    Empty { dir: PathBuf },
    #[error("{} recipe(s) have errors", .0.len())]
    Recipes(Vec<(String, RecipeErrors)>),
    #[error("base recipes form a cycle: {}", chain.join(" → "))]
    Cycle { chain: Vec<String> },
}

impl FleetError {
    pub fn hint(&self) -> Option<String> {
        match self {
            FleetError::Cycle { .. } => Some(
                "a recipe cannot build on itself, directly or through others: change one `base`"
                    .into(),
            ),
            FleetError::Empty { .. } => Some("name the directory that holds the recipes".into()),
            _ => None,
        }
    }
}

impl Fleet {
    /// Every recipe under `dir` (searched recursively), with its variables from defaults and
    /// `BAKE_VAR_*` (as base recipes are planned), linked to its base recipe.
    pub fn load(dir: &Path) -> Result<Fleet, FleetError> {
        let sources = VarSources::default().with_process_env();
        let mut files = Vec::new();
        discover(dir, &mut files)?;
        if files.is_empty() {
            return Err(FleetError::Empty {
                dir: dir.to_path_buf(),
            });
        }
        files.sort();
        let mut loaded: Vec<(String, Recipe)> = Vec::new();
        let mut errors = Vec::new();
        let mut index: HashMap<PathBuf, usize> = HashMap::new();
        let mut queue: Vec<PathBuf> = files;
        queue.reverse();
        while let Some(file) = queue.pop() {
            // `./a.yaml` is shown as `a.yaml`.
            let shown = file
                .strip_prefix(".")
                .unwrap_or(&file)
                .display()
                .to_string();
            match recipe::load(&file, &sources) {
                Ok(recipe) => {
                    if index.contains_key(&recipe.path) {
                        continue;
                    }
                    // A base recipe that is not under the directory joins the fleet: it is
                    // built (and planned) like the others.
                    if let Base::Recipe { path, .. } = &recipe.base
                        && !index.contains_key(path)
                        && !queue.contains(path)
                    {
                        queue.insert(0, path.clone());
                    }
                    index.insert(recipe.path.clone(), loaded.len());
                    loaded.push((shown, recipe));
                }
                Err(e) => errors.push((shown, e)),
            }
        }
        if !errors.is_empty() {
            return Err(FleetError::Recipes(errors));
        }
        let parents: Vec<Option<usize>> = loaded
            .iter()
            .map(|(_, recipe)| match &recipe.base {
                Base::Recipe { path, .. } => index.get(path).copied(),
                _ => None,
            })
            .collect();
        check_cycles(&loaded, &parents)?;
        Ok(Fleet::ordered(loaded, &parents))
    }

    /// The recipes `recipe` is built on, the farthest first (its own base last).
    pub fn chain_of(recipe: &Recipe) -> Result<Fleet, FleetError> {
        let sources = VarSources::default().with_process_env();
        let mut chain: Vec<(String, Recipe)> = Vec::new();
        let mut seen = vec![recipe.path.clone()];
        let mut next = match &recipe.base {
            Base::Recipe { path, .. } => Some(path.clone()),
            _ => None,
        };
        while let Some(path) = next {
            let shown = path.display().to_string();
            if seen.contains(&path) {
                let mut names: Vec<String> = seen.iter().map(|p| p.display().to_string()).collect();
                names.push(shown);
                return Err(FleetError::Cycle { chain: names });
            }
            let base = recipe::load(&path, &sources)
                .map_err(|e| FleetError::Recipes(vec![(shown.clone(), e)]))?;
            seen.push(path);
            next = match &base.base {
                Base::Recipe { path, .. } => Some(path.clone()),
                _ => None,
            };
            chain.push((shown, base));
        }
        chain.reverse();
        let members = chain
            .into_iter()
            .enumerate()
            .map(|(i, (shown, recipe))| Member {
                shown,
                recipe,
                parent: i.checked_sub(1),
            })
            .collect();
        Ok(Fleet { members })
    }

    /// Parents first, then their children; roots and siblings by shown path, so the order is
    /// also the tree's print order.
    fn ordered(loaded: Vec<(String, Recipe)>, parents: &[Option<usize>]) -> Fleet {
        let mut children: BTreeMap<Option<usize>, Vec<usize>> = BTreeMap::new();
        for (i, parent) in parents.iter().enumerate() {
            children.entry(*parent).or_default().push(i);
        }
        for list in children.values_mut() {
            list.sort_by(|a, b| loaded[*a].0.cmp(&loaded[*b].0));
        }
        let mut order = Vec::with_capacity(loaded.len());
        let mut stack: Vec<usize> = children.get(&None).cloned().unwrap_or_default();
        stack.reverse();
        while let Some(i) = stack.pop() {
            order.push(i);
            if let Some(kids) = children.get(&Some(i)) {
                stack.extend(kids.iter().rev());
            }
        }
        let position: HashMap<usize, usize> = order
            .iter()
            .enumerate()
            .map(|(new, old)| (*old, new))
            .collect();
        let mut slots: Vec<Option<(String, Recipe)>> = loaded.into_iter().map(Some).collect();
        let members = order
            .iter()
            .map(|old| {
                let (shown, recipe) = slots[*old].take().expect("each member once");
                Member {
                    shown,
                    recipe,
                    parent: parents[*old].map(|p| position[&p]),
                }
            })
            .collect();
        Fleet { members }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The members built directly on member `i`.
    pub fn children(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.members
            .iter()
            .enumerate()
            .filter(move |(_, m)| m.parent == Some(i))
            .map(|(j, _)| j)
    }

    /// Every member built on member `i`, directly or further down, in fleet order.
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&j| {
                let mut at = self.members[j].parent;
                while let Some(p) = at {
                    if p == i {
                        return true;
                    }
                    at = self.members[p].parent;
                }
                false
            })
            .collect()
    }

    /// How deep member `i` is: 0 for a recipe that is not built on another.
    pub fn depth(&self, i: usize) -> usize {
        let mut depth = 0;
        let mut at = self.members[i].parent;
        while let Some(p) = at {
            depth += 1;
            at = self.members[p].parent;
        }
        depth
    }

    /// The graph as `bake graph --output json` prints it.
    pub fn document(&self) -> FleetDocument<'_> {
        FleetDocument {
            recipes: self
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| MemberDocument {
                    recipe: &m.shown,
                    name: &m.recipe.name,
                    base: m.parent.map_or_else(
                        || BaseDocument::Other {
                            kind: base_kind(&m.recipe.base),
                        },
                        |p| BaseDocument::Recipe {
                            recipe: &self.members[p].shown,
                        },
                    ),
                    outputs: outputs(&m.recipe),
                    children: self
                        .children(i)
                        .map(|c| self.members[c].shown.as_str())
                        .collect(),
                })
                .collect(),
        }
    }

    /// The graph in Graphviz's language: one node per recipe, an edge from each base to the
    /// recipes built on it.
    pub fn dot(&self) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from("digraph recipes {\n  rankdir=LR;\n  node [shape=box];\n");
        for m in &self.members {
            let label = format!("{}\\n{}", m.recipe.name, outputs(&m.recipe).join(" + "));
            out.push_str(&format!(
                "  {} [label={}];\n",
                quote(&m.shown),
                quote(&label).replace("\\\\n", "\\n")
            ));
        }
        for m in &self.members {
            if let Some(p) = m.parent {
                out.push_str(&format!(
                    "  {} -> {};\n",
                    quote(&self.members[p].shown),
                    quote(&m.shown)
                ));
            }
        }
        out.push_str("}\n");
        out
    }

    /// The graph as a tree, one recipe per line, each under the recipe it is built on.
    pub fn tree(&self) -> String {
        fn walk(fleet: &Fleet, i: usize, prefix: &str, last: bool, out: &mut String) {
            let m = &fleet.members[i];
            let (branch, below) = match (m.parent, last) {
                (None, _) => ("", String::new()),
                (Some(_), false) => ("├─ ", format!("{prefix}│  ")),
                (Some(_), true) => ("└─ ", format!("{prefix}   ")),
            };
            let base = match m.parent {
                Some(_) => String::new(),
                None => format!(" from {}", base_kind(&m.recipe.base)),
            };
            out.push_str(&format!(
                "{prefix}{branch}{} ({}: {}){base}\n",
                m.shown,
                m.recipe.name,
                outputs(&m.recipe).join(" + ")
            ));
            let children: Vec<usize> = fleet.children(i).collect();
            for (n, child) in children.iter().enumerate() {
                walk(fleet, *child, &below, n + 1 == children.len(), out);
            }
        }
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.parent.is_none() {
                walk(self, i, "", true, &mut out);
            }
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct FleetDocument<'a> {
    pub recipes: Vec<MemberDocument<'a>>,
}

#[derive(Debug, Serialize)]
pub struct MemberDocument<'a> {
    pub recipe: &'a str,
    pub name: &'a str,
    pub base: BaseDocument<'a>,
    pub outputs: Vec<&'static str>,
    pub children: Vec<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BaseDocument<'a> {
    Recipe { recipe: &'a str },
    Other { kind: &'static str },
}

fn outputs(recipe: &Recipe) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    if recipe.outputs.oci.is_some() {
        kinds.push("oci");
    }
    if recipe.outputs.ami.is_some() {
        kinds.push("ami");
    }
    kinds
}

fn base_kind(base: &Base) -> &'static str {
    match base {
        Base::Scratch => "scratch",
        Base::Image { .. } => "image",
        Base::OciLayout { .. } => "oci_layout",
        Base::Rootfs { .. } => "rootfs",
        Base::Bootstrap(_) => "bootstrap",
        Base::Recipe { .. } => "recipe",
        Base::Ami(_) => "ami",
    }
}

/// The build record of `version` when the store holds a complete build of it: for an image,
/// the record and every blob the image names; for AMIs (which live in AWS), the record.
pub fn built_record(store: &Store, version: &Version) -> Option<BuildRecord> {
    let record = crate::store::record::load(store, version.as_str()).ok()??;
    if record.image().is_some()
        && !matches!(
            crate::build::pipeline::built_image(store, version.as_str()),
            Ok(Some(_))
        )
    {
        return None;
    }
    Some(record)
}

/// Every recipe file under `dir`: `.yaml`/`.yml` files with a top-level `bake:` key (the
/// format marker every recipe starts with), so task definitions, var files and other YAML
/// beside the recipes are left alone.
fn discover(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), FleetError> {
    let read = |source| FleetError::Read {
        dir: dir.to_path_buf(),
        source,
    };
    for entry in fs_err::read_dir(dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        let path = entry.path();
        let kind = entry.file_type().map_err(read)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if kind.is_dir() {
            if !SKIPPED_DIRS.contains(&name.as_ref()) {
                discover(&path, files)?;
            }
        } else if (name.ends_with(".yaml") || name.ends_with(".yml")) && is_recipe(&path) {
            files.push(path);
        }
    }
    Ok(())
}

fn is_recipe(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| {
        text.lines().any(|line| {
            line.strip_prefix("bake:")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        })
    })
}

/// A recipe's parents, followed up, never reach it again.
fn check_cycles(loaded: &[(String, Recipe)], parents: &[Option<usize>]) -> Result<(), FleetError> {
    // 0 unseen, 1 on the current path, 2 known to end at a root.
    let mut state = vec![0u8; loaded.len()];
    for start in 0..loaded.len() {
        let mut path = Vec::new();
        let mut at = Some(start);
        while let Some(i) = at {
            match state[i] {
                2 => break,
                1 => {
                    let from = path.iter().position(|p| *p == i).expect("on the path");
                    let mut chain: Vec<String> = path[from..]
                        .iter()
                        .map(|p: &usize| loaded[*p].0.clone())
                        .collect();
                    chain.push(loaded[i].0.clone());
                    return Err(FleetError::Cycle { chain });
                }
                _ => {
                    state[i] = 1;
                    path.push(i);
                    at = parents[i];
                }
            }
        }
        for i in path {
            state[i] = 2;
        }
    }
    Ok(())
}
